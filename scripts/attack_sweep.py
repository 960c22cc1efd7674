"""Sweep the embedded attacks' stage-2 settings (α, r range, ...) on one machine, GPU or CPU, in minutes.

    python scripts/attack_sweep.py --out sweep_attacks --accelerator gpu --jobs 6
    python scripts/attack_sweep.py --out /tmp/sweep --cache_dir /tmp/sweep_cache --quick   # a smoke run on CPU

One experiment spec run by the engine (experiments/): the main job's spec (configs/experiments/embedded.yaml)
with its attacks replaced by one training + one attack per variant of ``VARIANTS`` (the main job's training of
that attack, its configs and trigger input, plus the variant's overrides), no defense, and two scenarios: the
clean fine-tunes (TA over the spec's λ grid and TIES, every variant probed) and one per variant (its model + the
clean models of the other tasks, the same plan). The clean fine-tunes and the stage-1 triggers have the main
job's recipes, so with the same ``--cache_dir`` they are the main job's cached artifacts (``--accelerator cpu``
and ``pipeline.py``; ``--quick`` and ``pipeline.py --quick``), and a variant trained once is never retrained.

Outputs in ``--out``: the engine's results.json / summary.md (every λ) / plot / models, plus ``sweep.json``
(the variants and every row) and ``sweep.md`` (one line per variant at the headline λ, then the full table).
A research tool for choosing the embedded defaults (benchmarks/results/attack_sweep.md); the main job never runs it.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.cli import OneLineArgumentParser, UserError, check_output_path, run_cli
from experiments.spec import (
    Attack,
    ExperimentSpec,
    Scenario,
    Training,
    load_spec,
    restrict,
)

EMBEDDED_SPEC = "configs/experiments/embedded.yaml"

# name -> (attack, overrides): keys are model.init_args fields or full "trainer.*" arguments; "seed_everything"
# is the training's seed (the engine's one seed rule: seed_everything and the data seed); "task" is the attacker
# task (default: the task of the main job's training of that attack).
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
    # fifth round: the off-task default has a compositional shadow head and clean_shadow_weight β 5; β 0 is the
    # paper's loss on that head
    **{f"bm_off_cs{beta:g}": ("badmerging_offtask", {"clean_shadow_weight": beta}) for beta in (0.0, 1.0, 2.0, 10.0)},
    "bm_off_cs5_seed1": ("badmerging_offtask", {"seed_everything": 1}),
    "bm_on_a5_r02-10_seed1": ("badmerging_ontask", {"alpha": 5.0, "seed_everything": 1}),
    "bm_on_a8.5_r01-07_seed1": ("badmerging_ontask", {"alpha": 8.5, "r_min": 0.1, "r_max": 0.7, "seed_everything": 1}),
}


def variant_training(spec: ExperimentSpec, name: str) -> Training:
    """The training ``attack_<name>``: the spec's training of the variant's attack (configs, trigger input) with
    the variant's overrides appended (``trainer.*`` as given, the rest as ``model.init_args.*``)."""
    attack, overrides = VARIANTS[name]
    ref = next((a.training for a in spec.attacks if a.name == attack and a.training), None)
    if ref is None:
        raise UserError(f"variant {name}: attack {attack!r} is not a poisoning attack of {EMBEDDED_SPEC}; "
                        f"use one of {', '.join(a.name for a in spec.attacks if a.training)}")
    template = spec.all_trainings()[ref]
    args = list(template.overrides)
    for key, value in overrides.items():
        if key not in ("task", "seed_everything"):
            args += [f"--{key}" if key.startswith("trainer.") else f"--model.init_args.{key}", str(value)]
    return Training(name=f"attack_{name}", task=overrides.get("task", template.task), configs=list(template.configs),
                    kind=template.kind, overrides=args, inputs=dict(template.inputs),
                    seed=int(overrides.get("seed_everything", template.seed)), quick=list(template.quick))


def _plan_file_entries(scenario: Scenario) -> list[dict]:
    """The entries of the scenario's ``plan_files`` (the spec keeps them apart from its inline plan)."""
    import yaml

    return [e for f in scenario.plan_files for e in (yaml.safe_load(Path(f).read_text()) or {}).get("plan", [])]


def sweep_plan(spec: ExperimentSpec) -> list[dict]:
    """TA over the clean scenario's λ grid, then the attacked scenario's TIES entry (the main job's settings)."""
    clean = next(s for s in spec.scenarios if s.models == "clean")
    ta = next(e for e in clean.plan if e["method"] == "task_arithmetic")
    attacked = next(s for s in spec.scenarios if s.models == "attack")
    ties = next(e for e in attacked.plan + _plan_file_entries(attacked) if e["method"] == "ties")
    grid = ta["grid"] if ta.get("coefficients") == "grid" else ta["coefficients"]
    return [{"name": ta["name"], "method": ta["method"], "coefficients": list(grid)}, copy.deepcopy(ties)]


def sweep_spec(spec: ExperimentSpec, names: list[str]) -> ExperimentSpec:
    """``spec`` with one training + attack per variant (its own attacks dropped), no defense, and the clean and
    per-attack scenarios on :func:`sweep_plan`; unused trainings are dropped and the result validated."""
    spec = copy.deepcopy(spec)
    plan = sweep_plan(spec)
    variants = [variant_training(spec, n) for n in names]
    kept = [t for t in spec.trainings if t.kind == "trigger"]  # the stage-1 triggers the variants take as input
    spec.name = f"{spec.name}_attack_sweep"
    spec.trainings = kept + variants
    spec.attacks = [Attack(name=n, training=t.name) for n, t in zip(names, variants)]
    spec.scenarios = [Scenario(name="clean", models="clean", plan=plan, probe_attacks=True),
                      Scenario(name="attacked", models="attack", plan=copy.deepcopy(plan), zero_shot=False)]
    return restrict(spec, attacks=list(names), defenses=[])


def _pct(value) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def _row(rows: list[dict], scenario: str, merge: str, coefficient, trigger: bool) -> dict | None:
    """The undefended row of ``merge`` at ``coefficient`` in ``scenario``: the in-merge trigger's or the clean one."""
    for r in rows:
        same = r["coefficient"] is None if coefficient is None else (
            r["coefficient"] is not None and abs(r["coefficient"] - coefficient) < 1e-9)
        attack = r.get("attack")
        if (r.get("scenario") == scenario and r["merge"] == merge and same and r.get("defense", "none") == "none"
                and (isinstance(attack, dict) and attack.get("in_merge") if trigger else attack is None)):
            return r
    return None


def headline_table(rows: list[dict], names: list[str], coefficient: float, ties: str) -> str:
    """One line per variant: its individual ASR, TA at λ = ``coefficient`` (CA, ΔCA vs the all-clean merge, ASR,
    clean→target) and the TIES merge (CA, ASR)."""
    clean = _row(rows, "clean", "task_arithmetic", coefficient, trigger=False)
    head = (f"| variant | attack | task | overrides | individual ASR | TA {coefficient:g} mean CA | ΔCA | ASR | "
            f"clean→target | {ties} CA | {ties} ASR |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        attack, overrides = VARIANTS[n]
        task = overrides.get("task", "")
        shown = ", ".join(f"{k}={v}" for k, v in overrides.items() if k != "task")
        ind = _row(rows, n, "individual", None, trigger=True)
        ta = _row(rows, n, "task_arithmetic", coefficient, trigger=True)
        tie = _row(rows, n, ties, coefficient, trigger=True)
        delta = "" if ta is None or clean is None else f"{100 * (ta['mean_clean_acc'] - clean['mean_clean_acc']):+.1f}"
        lines.append(f"| {n} | {attack} | {task} | {shown} | {_pct(ind and ind['asr'])} | "
                     f"{_pct(ta and ta['mean_clean_acc'])} | {delta} | {_pct(ta and ta['asr'])} | "
                     f"{_pct(ta and ta['clean_to_target'])} | {_pct(tie and tie['mean_clean_acc'])} | "
                     f"{_pct(tie and tie['asr'])} |")
    return "\n".join(lines) + "\n"


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog="attack_sweep.py", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="sweep_attacks", help="the run's output folder")
    p.add_argument("--cache_dir", default=".cache/badmerging", help="data, heads and the engine's artifact cache")
    p.add_argument("--accelerator", default="cpu", help="every training's trainer.accelerator (cpu: the configs')")
    p.add_argument("--jobs", type=int, default=2, help="local worker processes, one torch thread each (1: inline)")
    p.add_argument("--quick", action="store_true", help="the spec's reduced run: few steps, small data (smoke test)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help="names from VARIANTS (default: all)")
    return p


def run(a) -> Path:
    """The sweep's spec through the engine; sweep.json and sweep.md from its results.json. Returns sweep.md."""
    from experiments.executors import LocalExecutor
    from experiments.graph import RunOptions
    from experiments.report import write_summary
    from experiments.run import run_experiment

    unknown = [n for n in a.variants if n not in VARIANTS]
    if unknown:
        raise UserError(f"--variants: unknown {unknown}; choose from the script's VARIANTS ({', '.join(VARIANTS)})")
    if len(set(a.variants)) != len(a.variants):
        raise UserError(f"--variants {a.variants} names a variant twice; list each once")
    check_output_path(a.out, "--out", is_dir=True, error=UserError)
    check_output_path(a.cache_dir, "--cache_dir", is_dir=True, error=UserError)
    t0 = time.time()
    names = list(a.variants)
    spec = sweep_spec(load_spec(EMBEDDED_SPEC), names)
    executor = LocalExecutor(a.jobs)  # refuses a bad --jobs before any work
    # the configs train on cpu: adding "--trainer.accelerator cpu" would only change every key (no cache sharing)
    train_overrides = [] if a.accelerator == "cpu" else ["--trainer.accelerator", a.accelerator]
    progress = a.jobs == 1 and not (os.environ.get("CI") or os.environ.get("BADMERGING_JOB_WORKER"))
    options = RunOptions(out_dir=a.out, cache_dir=a.cache_dir, quick=a.quick, progress=progress,
                         train_overrides=train_overrides)
    results = run_experiment(spec, options, executor)
    rows = json.loads(Path(results).read_text())["rows"]
    out = Path(a.out)
    ties = next(e["name"] for e in spec.scenarios[0].plan if e["method"] == "ties")
    payload = {"variants": {n: VARIANTS[n] for n in names}, "results": str(results), "rows": rows,
               "seconds": round(time.time() - t0, 1)}
    (out / "sweep.json").write_text(json.dumps(payload, indent=1))
    text = (headline_table(rows, names, spec.headline_coefficient, ties) + "\n"
            + write_summary(out, rows, list(spec.tasks), []))
    (out / "sweep.md").write_text(text)
    print(text)
    print(f"[sweep] done in {time.time() - t0:.0f}s")
    return out / "sweep.md"


def main(argv=None) -> int:
    def body() -> int:
        a = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        run(a)
        return 0

    return run_cli("attack_sweep.py", body)


if __name__ == "__main__":
    sys.exit(main())
