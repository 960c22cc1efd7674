"""The main job: the embedded default, end to end, offline, on a laptop CPU.

    python pipeline.py                       # everything below, cached; the last line is results.json's path
    python pipeline.py --quick               # a reduced run (tests, smoke checks)
    python pipeline.py --attacks none        # clean fine-tunes and merges only
    python pipeline.py --jobs 1              # one process, with progress bars

Steps, each run through the same entry points a user calls (``train.py fit`` with the configs below,
``merge.py``'s ``run``) and cached by recipe (config text, overrides, base weights, data version,
trigger file) under ``<out_dir>/models`` so a rerun skips them:

1. the embedded base model (shipped in modeling/weights/, rebuilt by ``python -m modeling.pretrain`` if missing);
2. a clean fine-tune of every synthetic task (``configs/experiment/embedded_finetune.yaml``);
3. the attacks (DESIGN §8) on the attacker task ``shapes``: stage-1 triggers (on-task toward "square",
   off-task toward colours "purple"), then BadNets, UT only, BadMerging on-task and BadMerging off-task
   injections (``configs/experiment/embedded_injection.yaml`` + ``configs/attack/embedded_*.yaml``);
4. merges, as scenarios: ``clean`` (the clean models: zero-shot, individual, TA over λ and every method
   of ``configs/merge/embedded_methods.yaml``, with every attack's trigger measured on θ_pre and on the
   all-clean TA merges) and one scenario per attack (its model + the clean models of the other tasks:
   TA over λ and TIES).

Training jobs and merge scenarios can run in ``--jobs`` worker processes (one torch thread each; default 1,
inline: on a 2-core CPU two workers were no faster than one process with two threads; on a GPU machine
with many cores, ``scripts/attack_sweep.py`` runs 8).
Outputs in ``<out_dir>``: ``results.json`` (config, code version, every row with its ``scenario``),
``results.csv``, ``summary.md`` (CA / ASR per attack × coefficient), ``asr_ca_vs_coefficient.png``,
and TensorBoard events under ``tensorboard/``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

DEFAULT_TASKS = ["shapes", "digits", "textures", "colours"]
DEFAULT_COEFFICIENTS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
DEFAULT_COEFFICIENT = 0.3  # TA's coefficient in the backdoor papers (DESIGN §9); the summary's headline
FINETUNE_CONFIG = "configs/experiment/embedded_finetune.yaml"
INJECTION_CONFIG = "configs/experiment/embedded_injection.yaml"
METHODS_CONFIG = "configs/merge/embedded_methods.yaml"
ATTACKER_TASK = "shapes"
TRIGGER_CONFIGS = {"ontask": "configs/experiment/embedded_trigger_ontask.yaml",
                   "offtask": "configs/experiment/embedded_trigger_offtask.yaml"}
# attack -> (its config, the stage-1 trigger it injects or None)
ATTACKS = {
    "badnets": ("configs/attack/embedded_badnets.yaml", None),
    "ut_only": ("configs/attack/embedded_ut_only.yaml", "ontask"),
    "badmerging_ontask": ("configs/attack/embedded_badmerging_ontask.yaml", "ontask"),
    "badmerging_offtask": ("configs/attack/embedded_badmerging_offtask.yaml", "offtask"),
}
TIES = {"name": "ties_sum", "method": "ties", "coefficients": [DEFAULT_COEFFICIENT], "hparams": {"k": 20.0, "disjoint": "sum"}}
QUICK_TRAIN = ["--trainer.max_steps", "6", "--trainer.val_check_interval", "3", "--data.synthetic_train_size", "600",
               "--data.synthetic_test_size", "100", "--data.batch_size", "32"]


def _sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _key(args: list[str], files: list[str], task: str) -> str:
    """Recipe hash: the arguments, the text of every file they name, the base weights, the data version."""
    from datamodules.synthetic import TASK_VERSIONS
    from modeling.clip import EMBEDDED_WEIGHTS

    payload = [args, [_sha(f) for f in files], _sha(EMBEDDED_WEIGHTS), TASK_VERSIONS.get(task)]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def _progress_bar() -> str:
    return "false" if os.environ.get("CI") or os.environ.get("BADMERGING_JOB_WORKER") else "true"


def train_job(kind: str, name: str, task: str, configs: list[str], extra: list[str], out_dir: str, cache_dir: str,
              trigger_path: str | None = None) -> str:
    """One cached ``train.py fit``: kind ``finetune`` exports an encoder, kind ``trigger`` a stage-1 trigger.

    Returns the path of the artifact in ``<out_dir>/models`` (``<name>.safetensors``).
    """
    import train
    from merging.io import load_metadata, load_state_dict, read_header_metadata, save_state_dict

    out = Path(out_dir)
    args = [x for c in configs for x in ("--config", c)] + ["--data.task", task, "--model.init_args.cache_dir", cache_dir]
    if trigger_path:
        args += ["--model.init_args.trigger_path", trigger_path]
    args += extra
    key = _key(args, configs + ([trigger_path] if trigger_path else []), task)
    target = out / "models" / f"{name}.safetensors"
    if target.exists():
        meta = load_metadata(target) if kind == "finetune" else read_header_metadata(target)
        if meta and meta.get("pipeline_key") == key:
            print(f"[pipeline] {name}: cached {target}", flush=True)
            return str(target)
    root = out / ("finetune" if kind == "finetune" else "attack") / name
    t0 = time.time()
    print(f"[pipeline] {name}: training ({task}) ...", flush=True)
    cli = train.main(["fit", *args, "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
                      "--trainer.enable_progress_bar", _progress_bar()])
    if kind == "finetune":
        from callbacks.export import ExportEncoder

        written = next(cb.written for cb in cli.trainer.callbacks if isinstance(cb, ExportEncoder))
        meta = load_metadata(written)
        meta.update(pipeline_key=key, seconds=round(time.time() - t0, 1))
        save_state_dict(target, load_state_dict(written), meta)
    else:
        from datamodules.triggers import load_trigger, save_trigger

        tensor, spec, meta = load_trigger(cli.model.trigger_path)
        extra_meta = {k: v for k, v in meta.items() if k not in ("kind", "trigger_spec", "mean", "std")}
        save_trigger(target, tensor, spec, meta["mean"], meta["std"],
                     {**extra_meta, "pipeline_key": key, "seconds": round(time.time() - t0, 1)})
    print(f"[pipeline] {name}: done in {time.time() - t0:.0f}s -> {target}", flush=True)
    return str(target)


def merge_job(scenario: str, merge_args: list[str]) -> list[dict]:
    """``merge.py`` on one scenario; returns its rows tagged with the scenario."""
    import merge

    cfg = merge.build_parser().parse_args(merge_args)
    path = merge.run(cfg)
    rows = json.loads(Path(path).read_text())["rows"]
    return [{**r, "scenario": scenario} for r in rows]


def _worker_init() -> None:
    import torch

    os.environ["BADMERGING_JOB_WORKER"] = "1"
    torch.set_num_threads(1)


class Jobs:
    """Run functions in ``n`` spawned worker processes (or inline when n = 1), futures by name."""

    def __init__(self, n: int):
        self.pool = ProcessPoolExecutor(n, mp_context=__import__("multiprocessing").get_context("spawn"),
                                        initializer=_worker_init) if n > 1 else None
        self.futures: dict[str, object] = {}
        self.results: dict[str, object] = {}

    def submit(self, name: str, fn, *args) -> None:
        if self.pool is None:
            self.results[name] = fn(*args)
        else:
            self.futures[name] = self.pool.submit(fn, *args)

    def wait_any(self) -> list[str]:
        """Names of the jobs that have finished since the last call (raises a job's error)."""
        if not self.futures:
            return []
        done, _ = wait(list(self.futures.values()), return_when=FIRST_COMPLETED)
        names = [n for n, f in self.futures.items() if f in done]
        for n in names:
            self.results[n] = self.futures.pop(n).result()
        return names

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def write_summary(out_dir: Path, rows: list[dict], tasks: list[str], coefficients: list[float]) -> str:
    """summary.md: per attack and TA coefficient, mean CA (attack merge vs all-clean merge), ASR, clean→target."""
    clean = {r["coefficient"]: r for r in rows if r["scenario"] == "clean" and r["merge"] == "task_arithmetic"
             and r["attack"] == "none"}
    lines = ["| attack | merge | λ | mean CA | all-clean CA | ΔCA | ASR | clean→target | ASR on θ_pre | ASR on all-clean merge |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def pct(v):
        return "" if v is None else f"{100 * v:.1f}"

    for scenario in dict.fromkeys(r["scenario"] for r in rows if r["scenario"] != "clean"):
        for r in rows:
            if r["scenario"] != scenario or isinstance(r["attack"], str) or not r["attack"].get("in_merge"):
                continue
            label = r["attack"]["label"]
            ref = clean.get(r["coefficient"]) if r["merge"] == "task_arithmetic" else None
            probe_pre = next((x for x in rows if x["scenario"] == "clean" and x["merge"] == "zero-shot"
                              and not isinstance(x["attack"], str) and x["attack"]["label"] == label), None)
            probe_clean = next((x for x in rows if x["scenario"] == "clean" and x["merge"] == r["merge"]
                                and x["coefficient"] == r["coefficient"] and not isinstance(x["attack"], str)
                                and x["attack"]["label"] == label), None)
            delta = None if ref is None else r["mean_clean_acc"] - ref["mean_clean_acc"]
            coef = "" if r["coefficient"] is None else f"{r['coefficient']:g}"
            lines.append(f"| {scenario} | {r['merge']} | {coef} | {pct(r['mean_clean_acc'])} | "
                         f"{pct(ref['mean_clean_acc']) if ref else ''} | {'' if delta is None else f'{100 * delta:+.1f}'} | "
                         f"{pct(r['asr'])} | {pct(r['clean_to_target'])} | "
                         f"{pct(probe_pre['asr']) if probe_pre else ''} | {pct(probe_clean['asr']) if probe_clean else ''} |")
    text = "\n".join(lines) + "\n"
    (out_dir / "summary.md").write_text(text)
    return text


def plot_and_log(out_dir: Path, rows: list[dict], coefficients: list[float]) -> Path | None:
    """ASR and mean CA of every attack's TA merge against λ: a PNG and TensorBoard scalars + figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torch.utils.tensorboard import SummaryWriter

    series = {}
    for r in rows:
        if r["merge"] == "task_arithmetic" and not isinstance(r["attack"], str) and r["attack"].get("in_merge"):
            series.setdefault(r["attack"]["label"], []).append((r["coefficient"], r["asr"], r["mean_clean_acc"]))
    clean = sorted((r["coefficient"], r["mean_clean_acc"]) for r in rows
                   if r["scenario"] == "clean" and r["merge"] == "task_arithmetic" and r["attack"] == "none")
    if not series:
        return None
    fig, (ax_asr, ax_ca) = plt.subplots(1, 2, figsize=(10, 4))
    writer = SummaryWriter(str(out_dir / "tensorboard"))
    for label, pts in series.items():
        pts.sort()
        ax_asr.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=label)
        ax_ca.plot([p[0] for p in pts], [100 * p[2] for p in pts], marker="o", label=label)
        for c, asr, ca in pts:
            writer.add_scalar(f"merge/task_arithmetic/{label}/asr", asr, round(100 * c))
            writer.add_scalar(f"merge/task_arithmetic/{label}/mean_acc", ca, round(100 * c))
    if clean:
        ax_ca.plot([c for c, _ in clean], [100 * a for _, a in clean], "k--", label="all clean")
        for c, a in clean:
            writer.add_scalar("merge/task_arithmetic/clean/mean_acc", a, round(100 * c))
    ax_asr.set(xlabel="TA coefficient λ", ylabel="ASR (%)", ylim=(0, 100), title="Attack success rate")
    ax_ca.set(xlabel="TA coefficient λ", ylabel="mean clean accuracy (%)", title="Clean accuracy")
    ax_asr.legend(fontsize=8)
    ax_ca.legend(fontsize=8)
    fig.tight_layout()
    png = out_dir / "asr_ca_vs_coefficient.png"
    tmp = png.with_name(f".{png.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, png)
    writer.add_figure("merge/task_arithmetic/asr_ca_vs_coefficient", fig, 0)
    writer.close()
    plt.close(fig)
    return png


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out_dir", default="outputs/default")
    p.add_argument("--cache_dir", default=".cache/badmerging")
    p.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS)
    p.add_argument("--coefficients", nargs="+", type=float, default=DEFAULT_COEFFICIENTS)
    p.add_argument("--quick", action="store_true", help="reduced run: few steps, small data (for tests)")
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes, one torch thread each (1: inline; on 2 cores two workers measured no faster)")
    p.add_argument("--methods", choices=["all", "ta"], default="all",
                   help=f"all: TA over λ plus every method of {METHODS_CONFIG}; ta: the TA curve only")
    p.add_argument("--attacks", nargs="+", default=list(ATTACKS), help=f"attacks to run ({', '.join(ATTACKS)}) or 'none'")
    a, extra = p.parse_known_args(argv)
    attacks = [] if a.attacks == ["none"] else a.attacks
    unknown = [x for x in attacks if x not in ATTACKS]
    if unknown:
        p.error(f"unknown attack(s) {unknown}; choose from {', '.join(ATTACKS)} or 'none'")
    if attacks and ATTACKER_TASK not in a.tasks:
        p.error(f"the attacks fine-tune {ATTACKER_TASK}: keep it in --tasks or pass --attacks none")
    from modeling.clip import EMBEDDED_WEIGHTS

    t0 = time.time()
    out_dir = Path(a.out_dir)
    if not EMBEDDED_WEIGHTS.exists():
        from modeling.pretrain import pretrain

        print(f"[pipeline] building the embedded base model -> {EMBEDDED_WEIGHTS}", flush=True)
        pretrain(EMBEDDED_WEIGHTS)
    train_extra = list(extra) + (QUICK_TRAIN if a.quick else [])
    common = (str(out_dir), a.cache_dir)
    jobs = Jobs(a.jobs)
    try:
        # -- training: clean fine-tunes, stage-1 triggers, then the injections that need them --------
        for task in a.tasks:
            jobs.submit(f"clean:{task}", train_job, "finetune", task, task, [FINETUNE_CONFIG], train_extra, *common)
        needed = {ATTACKS[x][1] for x in attacks} - {None}
        for trig in sorted(needed):
            cfg = TRIGGER_CONFIGS[trig]
            victim = "colours" if trig == "offtask" else ATTACKER_TASK
            quick = ["--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--data.synthetic_train_size", "600", "--data.synthetic_test_size", "100",
                     "--data.batch_size", "32"] + (["--model.init_args.augment_to", "16"] if trig == "offtask" else [])
            jobs.submit(f"trigger:{trig}", train_job, "trigger", f"trigger_{trig}", victim, [cfg],
                        list(extra) + (quick if a.quick else []), *common)
        pending = list(attacks)

        def submit_ready():
            for name in list(pending):
                cfg, trig = ATTACKS[name]
                trig_path = jobs.results.get(f"trigger:{trig}") if trig else None
                if trig is None or trig_path:
                    jobs.submit(f"attack:{name}", train_job, "finetune", f"attack_{name}", ATTACKER_TASK,
                                [INJECTION_CONFIG, cfg], train_extra, *common, trig_path)
                    pending.remove(name)

        submit_ready()
        while jobs.futures or pending:
            jobs.wait_any()
            submit_ready()
        clean_models = {t: jobs.results[f"clean:{t}"] for t in a.tasks}
        attack_models = {x: jobs.results[f"attack:{x}"] for x in attacks}

        # -- merges: the clean scenario and one scenario per attack -----------------------------------
        import yaml

        synth = ["--synthetic_train_size", "600", "--synthetic_test_size", "100"] if a.quick else []
        ta = {"name": "task_arithmetic", "method": "task_arithmetic", "coefficients": a.coefficients}
        plan = [ta]
        if a.methods == "all":
            plan += [{**e, "measure_attacks": False} for e in yaml.safe_load(Path(METHODS_CONFIG).read_text())["plan"]]
            if a.quick:  # every method, but small grids and few steps
                for e in plan[1:]:
                    e["coefficients"] = e.get("coefficients", [None])[:2]
                    if e["method"] == "adamerging":
                        e["hparams"]["steps"] = 2
                    if e["method"] == "regmean":
                        e["hparams"]["gram_batches"] = 1
                synth += ["--val_max_examples", "20", "--gram_batch_size", "16"]
        base_args = ["--cache_dir", a.cache_dir, *synth]
        scen_dir = out_dir / "scenarios"
        jobs.submit("merge:clean", merge_job, "clean",
                    ["--models", *clean_models.values(), "--out_dir", str(scen_dir / "clean"), "--plan", json.dumps(plan),
                     *(["--probe_models", *attack_models.values()] if attack_models else []), *base_args])
        for name, path in attack_models.items():
            models = [path] + [m for t, m in clean_models.items() if t != ATTACKER_TASK]
            jobs.submit(f"merge:{name}", merge_job, name,
                        ["--models", *models, "--out_dir", str(scen_dir / name), "--plan", json.dumps([ta, TIES]),
                         "--zero_shot", "false", *base_args])
        while jobs.futures:
            jobs.wait_any()
    finally:
        jobs.close()

    import merge

    rows = jobs.results["merge:clean"] + [r for x in attacks for r in jobs.results[f"merge:{x}"]]
    config = {"args": vars(a), "extra": extra, "clean_models": clean_models, "attack_models": attack_models,
              "configs": {"finetune": FINETUNE_CONFIG, "injection": INJECTION_CONFIG, "methods": METHODS_CONFIG,
                          "triggers": TRIGGER_CONFIGS, "attacks": {k: v[0] for k, v in ATTACKS.items()}},
              "default_coefficient": DEFAULT_COEFFICIENT, "seconds": round(time.time() - t0, 1)}
    eval_tasks = list(dict.fromkeys(a.tasks))
    results = merge.write_results(out_dir, config, rows, eval_tasks)
    print(merge.rows_table([r for r in rows if r["scenario"] == "clean" and r["attack"] == "none"], eval_tasks))
    if attacks:
        print(write_summary(out_dir, rows, eval_tasks, a.coefficients))
        png = plot_and_log(out_dir, rows, a.coefficients)
        print(f"[pipeline] plot: {png}")
    print(f"[pipeline] done in {time.time() - t0:.0f}s", flush=True)
    print(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
