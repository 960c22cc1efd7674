"""Sweep the embedded attacks' stage-2 settings (α, r range) on one machine, GPU or CPU, in minutes.

    python scripts/attack_sweep.py --out sweep_attacks --accelerator gpu --jobs 6
    python scripts/attack_sweep.py --out /tmp/sweep --quick --jobs 2           # a smoke run on CPU

Runs the main job's own pieces (``pipeline.train_job``, ``pipeline.merge_job``: ``train.py fit`` with
the embedded configs, ``merge.py``) for the clean fine-tunes, both stage-1 triggers and every variant
of ``VARIANTS`` (an attack config plus ``model.init_args`` overrides), then merges each variant with
the clean models of the other tasks (TA over λ, TIES) and the clean models alone. Writes
``<out>/sweep.json`` (every row) and ``<out>/sweep.md`` (one line per variant at λ = 0.3). A research
tool for choosing the embedded defaults; the main job never runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pipeline  # noqa: E402

# name -> (attack, overrides): keys are model.init_args fields, or full "trainer.*" / "seed_everything"
# arguments; "task" is the attacker task (default pipeline.ATTACKER_TASK).
VARIANTS = {
    "badnets_a5": ("badnets", {"alpha": 5.0}),
    "ut_only_a5": ("ut_only", {"alpha": 5.0}),
    "bm_on_a5_r02-10": ("badmerging_ontask", {"alpha": 5.0, "r_min": 0.2, "r_max": 1.0}),
    "bm_on_a5_r01-07": ("badmerging_ontask", {"alpha": 5.0, "r_min": 0.1, "r_max": 0.7}),
    "bm_on_a8.5_r01-07": ("badmerging_ontask", {"alpha": 8.5, "r_min": 0.1, "r_max": 0.7}),
    "bm_on_a8.5_r02-10": ("badmerging_ontask", {"alpha": 8.5, "r_min": 0.2, "r_max": 1.0}),
    "bm_on_a12_r01-07": ("badmerging_ontask", {"alpha": 12.0, "r_min": 0.1, "r_max": 0.7}),
    "bm_on_a5_r00-05": ("badmerging_ontask", {"alpha": 5.0, "r_min": 0.0, "r_max": 0.5}),
    "bm_off_a5_r02-10": ("badmerging_offtask", {"alpha": 5.0, "r_min": 0.2, "r_max": 1.0}),
    "bm_off_a10_r02-10": ("badmerging_offtask", {"alpha": 10.0, "r_min": 0.2, "r_max": 1.0}),
    "bm_off_a10_r01-07": ("badmerging_offtask", {"alpha": 10.0, "r_min": 0.1, "r_max": 0.7}),
    "bm_off_a15_r01-07": ("badmerging_offtask", {"alpha": 15.0, "r_min": 0.1, "r_max": 0.7}),
    # second round: the off-task attack collapses colours onto "purple" (clean-to-target 44-75% at TA 0.3)
    "bm_off_lr3e-4": ("badmerging_offtask", {"alpha": 5.0, "lr": 3e-4}),
    "bm_off_pf025": ("badmerging_offtask", {"alpha": 5.0, "poison_fraction": 0.25}),
    "bm_off_steps200": ("badmerging_offtask", {"alpha": 5.0, "trainer.max_steps": 200}),
    "bm_off_a2": ("badmerging_offtask", {"alpha": 2.0}),
    "bm_off_r05-10": ("badmerging_offtask", {"alpha": 5.0, "r_min": 0.5, "r_max": 1.0}),
    "bm_off_textures": ("badmerging_offtask", {"alpha": 5.0, "task": "textures"}),
    "bm_off_digits": ("badmerging_offtask", {"alpha": 5.0, "task": "digits"}),
    "bm_off_digits_lr3e-4": ("badmerging_offtask", {"alpha": 5.0, "task": "digits", "lr": 3e-4}),
    # third round: shorter injections for the main job's time budget (on-task at the embedded default)
    **{f"{short}_s{steps}_pf{pf}": (attack, {**hp, "trainer.max_steps": steps, "trainer.val_check_interval": steps,
                                               "poison_fraction": pf})
       for short, attack, hp in (("bm_on", "badmerging_ontask", {"alpha": 8.5, "r_min": 0.1, "r_max": 0.7}),
                                 ("badnets", "badnets", {"alpha": 5.0}), ("ut_only", "ut_only", {"alpha": 5.0}),
                                 ("bm_off", "badmerging_offtask", {"alpha": 5.0}))
       for steps, pf in ((200, 0.5), (300, 0.5), (250, 0.25), (200, 0.25))},
    "bm_on_a5_r02-10_seed1": ("badmerging_ontask", {"alpha": 5.0, "seed_everything": 1}),
    "bm_on_a8.5_r01-07_seed1": ("badmerging_ontask", {"alpha": 8.5, "r_min": 0.1, "r_max": 0.7, "seed_everything": 1}),
}


def _args(overrides: dict) -> tuple[str, list[str]]:
    """(attacker task, CLI arguments) of a variant's overrides."""
    task = overrides.get("task", pipeline.ATTACKER_TASK)
    args = []
    for k, v in overrides.items():
        if k != "task":
            args += [f"--{k}" if k.startswith("trainer.") or k == "seed_everything" else f"--model.init_args.{k}", str(v)]
    return task, args


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="sweep_attacks")
    p.add_argument("--cache_dir", default=".cache/badmerging")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    a = p.parse_args(argv)
    t0 = time.time()
    out = Path(a.out)
    extra = ["--trainer.accelerator", a.accelerator] + (pipeline.QUICK_TRAIN if a.quick else [])
    common = (str(out), a.cache_dir)
    jobs = pipeline.Jobs(a.jobs)
    try:
        for task in pipeline.DEFAULT_TASKS:
            jobs.submit(f"clean:{task}", pipeline.train_job, "finetune", task, task, [pipeline.FINETUNE_CONFIG], extra, *common)
        for trig, cfg in pipeline.TRIGGER_CONFIGS.items():
            victim = "colours" if trig == "offtask" else pipeline.ATTACKER_TASK
            quick = ["--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--data.synthetic_train_size", "600",
                     "--data.synthetic_test_size", "100"] + (["--model.init_args.augment_to", "16"] if trig == "offtask" else [])
            jobs.submit(f"trigger:{trig}", pipeline.train_job, "trigger", f"trigger_{trig}", victim, [cfg],
                        ["--trainer.accelerator", a.accelerator] + (quick if a.quick else []), *common)
        pending = list(a.variants)
        while jobs.futures or pending:
            for name in list(pending):
                attack, overrides = VARIANTS[name]
                cfg, trig = pipeline.ATTACKS[attack]
                trig_path = jobs.results.get(f"trigger:{trig}") if trig else None
                if trig is None or trig_path:
                    task, args = _args(overrides)
                    jobs.submit(f"attack:{name}", pipeline.train_job, "finetune", f"attack_{name}", task,
                                [pipeline.INJECTION_CONFIG, cfg], extra + args, *common, trig_path)
                    pending.remove(name)
            jobs.wait_any()
        clean = {t: jobs.results[f"clean:{t}"] for t in pipeline.DEFAULT_TASKS}
        synth = ["--synthetic_train_size", "600", "--synthetic_test_size", "100"] if a.quick else []
        ta = {"name": "task_arithmetic", "method": "task_arithmetic", "coefficients": pipeline.DEFAULT_COEFFICIENTS}
        base = ["--cache_dir", a.cache_dir, *synth]
        attack_models = [jobs.results[f"attack:{n}"] for n in a.variants]
        jobs.submit("merge:clean", pipeline.merge_job, "clean",
                    ["--models", *clean.values(), "--out_dir", str(out / "scenarios" / "clean"), "--plan",
                     json.dumps([ta, pipeline.TIES]), "--probe_models", *attack_models, *base])
        for name, path in zip(a.variants, attack_models):
            task = _args(VARIANTS[name][1])[0]
            models = [path] + [m for t, m in clean.items() if t != task]
            jobs.submit(f"merge:{name}", pipeline.merge_job, name,
                        ["--models", *models, "--out_dir", str(out / "scenarios" / name), "--plan",
                         json.dumps([ta, pipeline.TIES]), "--zero_shot", "false", *base])
        while jobs.futures:
            jobs.wait_any()
    finally:
        jobs.close()
    rows = jobs.results["merge:clean"] + [r for n in a.variants for r in jobs.results[f"merge:{n}"]]
    (out / "sweep.json").write_text(json.dumps({"variants": VARIANTS, "rows": rows, "seconds": time.time() - t0}, indent=1))
    text = pipeline.write_summary(out, rows, pipeline.DEFAULT_TASKS, pipeline.DEFAULT_COEFFICIENTS)
    (out / "sweep.md").write_text(text)
    print(text)
    print(f"[sweep] done in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
