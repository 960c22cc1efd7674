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
TRIGGER_VICTIMS = {"ontask": ATTACKER_TASK, "offtask": "colours"}  # the task each stage-1 trigger is trained on
# attack -> (its config, the stage-1 trigger it injects or None)
ATTACKS = {
    "badnets": ("configs/attack/embedded_badnets.yaml", None),
    "ut_only": ("configs/attack/embedded_ut_only.yaml", "ontask"),
    "badmerging_ontask": ("configs/attack/embedded_badmerging_ontask.yaml", "ontask"),
    "badmerging_offtask": ("configs/attack/embedded_badmerging_offtask.yaml", "offtask"),
}
# Sparse Backdoor Vectors (DESIGN §10): the BVs of BadMerging on-task and UT only (two attack types, the
# attacks above) plus BadMerging on-task at each of SBV_SEEDS (data seeds), all against one clean
# reference of the injection recipe; summed, sparsified or sign-filtered, and injected (λ = scale).
# Ours for the embedded scale (bv.py sbv measures other settings): with SBV_SEEDS = [1] the sum is
# stronger still but costs the merge ~1-2.5 points of clean accuracy (README, Backdoor Vectors).
BV_CLEAN_CONFIG = "configs/bv/embedded_clean_reference.yaml"
SBV_SEEDS: list[int] = []
SBV_ATTACKS = {
    "sbv": {"combine": "sum", "k": 30.0, "sign_consistent": False, "scale": 1.0},
    "sbv_sc": {"combine": "sum", "k": 100.0, "sign_consistent": True, "scale": 1.0},
}
# IBVS: the defender's own clean / self-backdoored pair on DEFENDER_TASK (its own patch and target).
IBVS_CONFIG = "configs/defense/embedded_ibvs_backdoored.yaml"
DEFENDER_TASK = "shapes"
IBVS_ALPHAS = [0.25, 0.5, 0.75, 1.0]
IBVS_COEFFICIENTS = [0.1, 0.2, 0.3]  # TA coefficients merged with IBVS as well (TIES always)
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


def _is_trigger(r: dict, label: str | None = None) -> bool:
    return not isinstance(r["attack"], str) and (label is None or r["attack"]["label"] == label)


def write_summary(out_dir: Path, rows: list[dict], tasks: list[str], coefficients: list[float]) -> str:
    """summary.md: per attack and merge, mean CA (vs the all-clean merge), ASR, clean→target, the same trigger on
    θ_pre and on the all-clean merge, and the inherent (stage-1) trigger on this merge; then IBVS before/after."""
    plain = [r for r in rows if r.get("defense", "none") == "none"]
    clean = {r["coefficient"]: r for r in plain if r["scenario"] == "clean" and r["merge"] == "task_arithmetic"
             and r["attack"] == "none"}
    lines = ["| attack | merge | λ | mean CA | all-clean CA | ΔCA | ASR | clean→target | ASR on θ_pre | "
             "ASR on all-clean merge | inherent trigger ASR |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def pct(v):
        return "" if v is None else f"{100 * v:.1f}"

    def same_merge(x, r):
        return x["merge"] == r["merge"] and x["coefficient"] == r["coefficient"]

    scenarios = list(dict.fromkeys(r["scenario"] for r in rows if r["scenario"] != "clean"))
    for scenario in scenarios:
        for r in plain:
            if r["scenario"] != scenario or not _is_trigger(r) or not r["attack"].get("in_merge"):
                continue
            label = r["attack"]["label"]
            ref = clean.get(r["coefficient"]) if r["merge"] == "task_arithmetic" else None
            probe_pre = next((x for x in plain if x["scenario"] == "clean" and x["merge"] == "zero-shot" and _is_trigger(x, label)), None)
            probe_clean = next((x for x in plain if x["scenario"] == "clean" and same_merge(x, r) and _is_trigger(x, label)), None)
            inherent = next((x for x in plain if x["scenario"] == scenario and same_merge(x, r) and _is_trigger(x)
                             and x["attack"].get("name") == "inherent"
                             and x["attack"].get("target_task") == r["attack"].get("target_task")), None)
            delta = None if ref is None else r["mean_clean_acc"] - ref["mean_clean_acc"]
            coef = "" if r["coefficient"] is None else f"{r['coefficient']:g}"
            lines.append(f"| {scenario} | {r['merge']} | {coef} | {pct(r['mean_clean_acc'])} | "
                         f"{pct(ref['mean_clean_acc']) if ref else ''} | {'' if delta is None else f'{100 * delta:+.1f}'} | "
                         f"{pct(r['asr'])} | {pct(r['clean_to_target'])} | "
                         f"{pct(probe_pre['asr']) if probe_pre else ''} | {pct(probe_clean['asr']) if probe_clean else ''} | "
                         f"{pct(inherent['asr']) if inherent else ''} |")
    selected = [r for r in rows if r.get("defense") == "ibvs" and r.get("defense_selected") and _is_trigger(r)
                and r["attack"].get("in_merge")]
    if selected:
        lines += ["", "IBVS (the defender's own pair; α chosen on clean val data only): ASR and mean CA before → after",
                  "", "| attack | merge | λ | α | ASR before | ASR after | clean→target after | mean CA before | mean CA after | ΔCA |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in selected:
            before = next((x for x in plain if x["scenario"] == r["scenario"] and same_merge(x, r)
                           and _is_trigger(x, r["attack"]["label"])), None)
            if before is None:
                continue
            coef = "" if r["coefficient"] is None else f"{r['coefficient']:g}"
            lines.append(f"| {r['scenario']} | {r['merge']} | {coef} | {r['defense_alpha']:g} | {pct(before['asr'])} | "
                         f"{pct(r['asr'])} | {pct(r['clean_to_target'])} | {pct(before['mean_clean_acc'])} | "
                         f"{pct(r['mean_clean_acc'])} | {100 * (r['mean_clean_acc'] - before['mean_clean_acc']):+.1f} |")
    text = "\n".join(lines) + "\n"
    tmp = out_dir / f".summary.md.tmp{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, out_dir / "summary.md")
    return text


def plot_and_log(out_dir: Path, rows: list[dict], coefficients: list[float]) -> Path | None:
    """ASR and mean CA of every attack's TA merge against λ: a PNG and TensorBoard scalars + figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torch.utils.tensorboard import SummaryWriter

    series = {}
    for r in rows:
        if (r["merge"] == "task_arithmetic" and not isinstance(r["attack"], str) and r["attack"].get("in_merge")
                and r.get("defense", "none") == "none"):
            series.setdefault(r["attack"]["label"], []).append((r["coefficient"], r["asr"], r["mean_clean_acc"]))
    clean = sorted((r["coefficient"], r["mean_clean_acc"]) for r in rows if r["scenario"] == "clean"
                   and r["merge"] == "task_arithmetic" and r["attack"] == "none" and r.get("defense", "none") == "none")
    if not series:
        return None
    fig, (ax_asr, ax_ca) = plt.subplots(1, 2, figsize=(10, 4))
    for old in (out_dir / "tensorboard").glob("events.out.tfevents.*"):
        old.unlink()  # a rerun replaces the curves instead of adding a second point at every step
    writer = SummaryWriter(str(out_dir / "tensorboard"))
    for label, pts in series.items():
        pts.sort()
        ax_asr.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=label)
        ax_ca.plot([p[0] for p in pts], [100 * p[2] for p in pts], marker="o", label=label)
        for c, asr, ca in pts:
            writer.add_scalar(f"merge/task_arithmetic/{label}/asr", asr, round(100 * c))
            writer.add_scalar(f"merge/task_arithmetic/{label}/mean_acc", ca, round(100 * c))
    for r in rows:  # IBVS at its selected α: the defended ASR / CA beside the undefended curves
        if (r["merge"] == "task_arithmetic" and r.get("defense") == "ibvs" and r.get("defense_selected")
                and not isinstance(r["attack"], str) and r["attack"].get("in_merge")):
            step = round(100 * r["coefficient"])
            writer.add_scalar(f"merge/task_arithmetic/{r['attack']['label']}/asr_ibvs", r["asr"], step)
            writer.add_scalar(f"merge/task_arithmetic/{r['attack']['label']}/mean_acc_ibvs", r["mean_clean_acc"], step)
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
    every = list(ATTACKS) + list(SBV_ATTACKS)
    p.add_argument("--attacks", nargs="+", default=every, help=f"attacks to run ({', '.join(every)}) or 'none'")
    p.add_argument("--defense", choices=["ibvs", "none"], default="ibvs",
                   help=f"ibvs: every attack is also merged with IBVS (defender task {DEFENDER_TASK}, α {IBVS_ALPHAS})")
    a, extra = p.parse_known_args(argv)
    attacks = [] if a.attacks == ["none"] else a.attacks
    unknown = [x for x in attacks if x not in every]
    if unknown:
        p.error(f"unknown attack(s) {unknown}; choose from {', '.join(every)} or 'none'")
    if a.defense == "ibvs" and DEFENDER_TASK not in a.tasks:
        p.error(f"IBVS trains the defender's pair on {DEFENDER_TASK}: keep it in --tasks or pass --defense none")
    if attacks and ATTACKER_TASK not in a.tasks:
        p.error(f"the attacks fine-tune {ATTACKER_TASK}: keep it in --tasks or pass --attacks none")
    from modeling.clip import EMBEDDED_WEIGHTS

    t0 = time.time()
    out_dir = Path(a.out_dir)
    if not EMBEDDED_WEIGHTS.exists():
        from modeling.pretrain import pretrain

        print(f"[pipeline] building the embedded base model -> {EMBEDDED_WEIGHTS}", flush=True)
        pretrain(EMBEDDED_WEIGHTS)
    from bv import seed_args

    train_extra = list(extra) + (QUICK_TRAIN if a.quick else [])
    common = (str(out_dir), a.cache_dir)
    jobs = Jobs(a.jobs)
    try:
        # -- training: clean fine-tunes, stage-1 triggers, then the injections that need them --------
        for task in a.tasks:
            jobs.submit(f"clean:{task}", train_job, "finetune", task, task, [FINETUNE_CONFIG], train_extra, *common)
        sbv_wanted = [x for x in attacks if x in SBV_ATTACKS]
        injections = [x for x in ATTACKS if x in attacks or (sbv_wanted and x in ("badmerging_ontask", "ut_only"))]
        defend = a.defense == "ibvs" and bool(attacks)
        refs = sorted(({ATTACKER_TASK} if sbv_wanted else set()) | ({DEFENDER_TASK} if defend else set()))
        for task in refs:  # clean references of the injection recipe (seed 0): SBV and IBVS pairs
            jobs.submit(f"bvref:{task}", train_job, "finetune", f"bv_clean_{task}", task, [INJECTION_CONFIG, BV_CLEAN_CONFIG],
                        train_extra, *common)
        if defend:
            jobs.submit("ibvs:backdoored", train_job, "finetune", f"ibvs_backdoored_{DEFENDER_TASK}", DEFENDER_TASK,
                        [INJECTION_CONFIG, IBVS_CONFIG], train_extra, *common)
        needed = {ATTACKS[x][1] for x in injections} - {None}
        for trig in sorted(needed):
            cfg = TRIGGER_CONFIGS[trig]
            victim = TRIGGER_VICTIMS[trig]
            quick = ["--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--data.synthetic_train_size", "600", "--data.synthetic_test_size", "100",
                     "--data.batch_size", "32"] + (["--model.init_args.augment_to", "16"] if trig == "offtask" else [])
            jobs.submit(f"trigger:{trig}", train_job, "trigger", f"trigger_{trig}", victim, [cfg],
                        list(extra) + (quick if a.quick else []), *common)
        pending = list(injections) + [f"sbv_s{seed}" for seed in (SBV_SEEDS if sbv_wanted else [])]

        def submit_ready():
            for name in list(pending):
                cfg, trig = ATTACKS[name] if name in ATTACKS else (ATTACKS["badmerging_ontask"][0], "ontask")
                trig_path = jobs.results.get(f"trigger:{trig}") if trig else None
                if trig is None or trig_path:
                    if name in ATTACKS:
                        jobs.submit(f"attack:{name}", train_job, "finetune", f"attack_{name}", ATTACKER_TASK,
                                    [INJECTION_CONFIG, cfg], train_extra, *common, trig_path)
                    else:  # an SBV variant: BadMerging on-task at another seed
                        jobs.submit(f"variant:{name}", train_job, "finetune", f"sbv_badmerging_{name[4:]}", ATTACKER_TASK,
                                    [INJECTION_CONFIG, cfg], train_extra + seed_args(int(name[5:])), *common, trig_path)
                    pending.remove(name)

        submit_ready()
        while jobs.futures or pending:
            jobs.wait_any()
            submit_ready()
        clean_models = {t: jobs.results[f"clean:{t}"] for t in a.tasks}
        attack_models = {x: jobs.results[f"attack:{x}"] for x in attacks if x in ATTACKS}
        if sbv_wanted:
            from bv import build_sbv

            variants = {"badmerging_s0": jobs.results["attack:badmerging_ontask"], "ut_only_s0": jobs.results["attack:ut_only"],
                        **{f"badmerging_s{seed}": jobs.results[f"variant:sbv_s{seed}"] for seed in SBV_SEEDS}}
            for name in sbv_wanted:
                attack_models[name] = str(build_sbv(jobs.results[f"bvref:{ATTACKER_TASK}"], variants,
                                                    {"name": name, "scope": "tensor", **SBV_ATTACKS[name]}, "badmerging_s0",
                                                    out_dir / "models" / f"attack_{name}.safetensors"))
        defense_args = (["--defense", "ibvs", "--ibvs_clean", jobs.results[f"bvref:{DEFENDER_TASK}"],
                         "--ibvs_backdoored", jobs.results["ibvs:backdoored"], "--ibvs_alphas", *map(str, IBVS_ALPHAS)]
                        if defend else [])
        inherent = ["--probe_triggers", *[jobs.results[f"trigger:{t}"] for t in sorted(needed)]] if needed else []

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
                     *(["--probe_models", *attack_models.values()] if attack_models else []), *inherent, *base_args])
        low = [c for c in a.coefficients if c in IBVS_COEFFICIENTS]
        attack_plan = ([{**ta, "coefficients": low}] if low else []) + [
            {**ta, "coefficients": [c for c in a.coefficients if c not in low], "defend": False}, TIES]
        attack_plan = [e for e in attack_plan if e["coefficients"]]
        for name, path in attack_models.items():
            models = [path] + [m for t, m in clean_models.items() if t != ATTACKER_TASK]
            jobs.submit(f"merge:{name}", merge_job, name,
                        ["--models", *models, "--out_dir", str(scen_dir / name), "--plan", json.dumps(attack_plan),
                         "--zero_shot", "false", *defense_args, *inherent, *base_args])
        while jobs.futures:
            jobs.wait_any()
    finally:
        jobs.close()

    import merge

    rows = jobs.results["merge:clean"] + [r for x in attack_models for r in jobs.results[f"merge:{x}"]]
    config = {"args": vars(a), "extra": extra, "clean_models": clean_models, "attack_models": attack_models,
              "configs": {"finetune": FINETUNE_CONFIG, "injection": INJECTION_CONFIG, "methods": METHODS_CONFIG,
                          "triggers": TRIGGER_CONFIGS, "attacks": {k: v[0] for k, v in ATTACKS.items()},
                          "bv_clean_reference": BV_CLEAN_CONFIG, "ibvs": IBVS_CONFIG},
              "sbv": {"seeds": SBV_SEEDS, "outputs": SBV_ATTACKS} if sbv_wanted else None,
              "ibvs": {"defender_task": DEFENDER_TASK, "alphas": IBVS_ALPHAS, "coefficients": IBVS_COEFFICIENTS} if defend else None,
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
