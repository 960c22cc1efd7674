"""Backdoor Vectors (DESIGN §10): paired runs, BV similarity / transfer / scaling, and SBV attackers.

    python bv.py analyze --config configs/bv/embedded_analysis.yaml     # cosine heat-maps, transfer, scaling
    python bv.py sbv --config configs/bv/embedded_sbv.yaml              # train the variants, build SBV / SBV_SC
    python bv.py sbv --config configs/bv/embedded_sbv.yaml --jobs 4 --devices 0 1 2 3   # one variant per GPU
    python bv.py sbv --config ... --array_index $SLURM_ARRAY_TASK_ID    # SLURM array: one run per task
    python bv.py sbv --config ... --build_only                          # then combine (after the array)

**Paired runs.** A backdoored run named in a config trains with ``base_config`` (the injection recipe)
plus its own attack config and arguments, at its ``seed``; its clean reference trains with the same
``base_config`` plus ``clean_config`` (FineTune instead of BackdoorInjection) at the same seed and
task. Both draw the identical clean batch stream (the poisoning has its own generator), so
BV = θ_bd − θ_clean isolates the attack. Runs go through ``train.py fit`` and are cached by recipe
under ``<out_dir>/models`` (``pipeline.train_job``), so a rerun only analyses.

**analyze** writes ``<out_dir>/bv_analysis.json`` (config, code version, runs with their attributes,
cosine matrix, per-block matrices, transfer matrix with counts, scaling curves, findings),
``cosine.csv``, ``transfer.csv``, and PNGs ``bv_cosine.png``, ``bv_cosine_blocks.png``,
``bv_transfer.png``, ``bv_scaling.png``, also logged to TensorBoard (``<out_dir>/tensorboard``, tags
``bv/cosine``, ``bv/cosine_blocks``, ``bv/transfer``, ``bv/scaling``; scalars ``bv/scaling/<run>/asr``).
Transfer: T(A→B) = ASR_B(θ_clean^B + λ·BV_A) with B's trigger on B's target task.

**sbv** trains one clean reference (``task``, ``seed``) and n variants (any seed: the part of a BV
that differs between seeds is what combining and sign consistency filter out), then for every entry of ``outputs`` builds
SBV = top-k%(combine(BV_1 … BV_n)) (``sign_consistent: true`` = SBV_SC) and exports
θ_submit = θ_clean + scale·SBV to ``<out_dir>/<name>.safetensors`` with the metadata of the variant
named by ``trigger_from`` (its trigger is the one the SBV is measured with) plus an ``sbv`` record.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from pathlib import Path

import torch
from jsonargparse import ActionConfigFile, ArgumentParser

from merging.backdoor_vectors import (COMBINE_METHODS, backdoor_vector, inject, similarity_matrix,
                                      sparse_backdoor_vector)
from merging.io import MergeInputError, load_metadata, load_state_dict, save_state_dict
from modeling.version import code_version

BASE_CONFIG = "configs/experiment/embedded_injection.yaml"
CLEAN_CONFIG = "configs/bv/embedded_clean_reference.yaml"
ATTRIBUTES = ("task", "attack", "location", "target", "seed")


class BVInputError(ValueError):
    """A bv.py input that cannot be used; the one-line message names it and the fix."""


# ---------------------------------------------------------------------------------------------
# Paired runs
# ---------------------------------------------------------------------------------------------
def _run_spec(entry: dict, default_task: str, default_seed: int) -> dict:
    if not isinstance(entry, dict) or not entry.get("name"):
        raise BVInputError(f"run {entry!r} has no name; give every run a unique 'name'")
    known = {"name", "task", "seed", "configs", "args", "trigger_path", "model"}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise BVInputError(f"run {entry['name']}: unknown key(s) {unknown}; use {sorted(known)}")
    spec = {"task": default_task, "seed": default_seed, "configs": [], "args": [], "trigger_path": None, "model": None,
            **entry}
    spec["args"] = [str(a) for a in spec["args"]]
    for path in spec["configs"] + [p for p in (spec["trigger_path"], spec["model"]) if p]:
        if not Path(path).is_file():
            raise BVInputError(f"run {spec['name']}: {path} does not exist; fix the path in the config")
    return spec


def clean_name(task: str, seed: int) -> str:
    return f"clean_{task}_s{seed}"


def seed_args(seed: int) -> list[str]:
    """A run's seed: the data seed (renders and shuffling order: ``data.seed``) and ``seed_everything``.

    The model starts from θ_pre and draws nothing random itself, so the data seed is what makes two seeds
    differ. Seed 0 is the configs' default and adds no arguments, so its cache key is the plain recipe's.
    """
    return [] if seed == 0 else ["--seed_everything", str(seed), "--data.seed", str(seed)]


def _device_args(index: int, devices: list[str]) -> list[str]:
    """Pin job ``index`` to one of ``devices`` (GPU ids); nothing on CPU."""
    if not devices:
        return []
    return ["--trainer.accelerator", "gpu", "--trainer.devices", f"[{devices[index % len(devices)]}]"]


def train_paired(runs: list[dict], cfg, only: int | None = None, refs: list[tuple[str, int]] | None = None) -> tuple[dict, dict]:
    """Train (or take from the cache) every run and the clean reference of each (task, seed) (or of ``refs``).

    Returns ({(task, seed): clean path}, {run name: backdoored path}). ``only`` = an index into the
    list [clean references (sorted), runs...] trains just that one (a SLURM array task).
    """
    from pipeline import Jobs, train_job

    refs = sorted(refs or {(r["task"], r["seed"]) for r in runs})
    todo = [("clean", t, s, None) for t, s in refs] + [("run", r["task"], r["seed"], r) for r in runs if not r["model"]]
    if only is not None:
        if not 0 <= only < len(todo):
            raise BVInputError(f"--array_index {only} is out of range: this config has {len(todo)} runs (0..{len(todo) - 1})")
        todo = [todo[only]]
    common = (str(cfg.out_dir), cfg.cache_dir)
    jobs = Jobs(cfg.jobs)
    try:
        for i, (kind, task, seed, run) in enumerate(todo):
            extra = list(cfg.train_args) + seed_args(seed) + _device_args(i, cfg.devices)
            if kind == "clean":
                jobs.submit(clean_name(task, seed), train_job, "finetune", clean_name(task, seed), task,
                            [cfg.base_config, cfg.clean_config], extra, *common)
            else:
                jobs.submit(run["name"], train_job, "finetune", run["name"], task, [cfg.base_config, *run["configs"]],
                            run["args"] + extra, *common, run["trigger_path"])
        while jobs.futures:
            jobs.wait_any()
    finally:
        jobs.close()
    models = Path(cfg.out_dir) / "models"
    clean = {(t, s): str(models / f"{clean_name(t, s)}.safetensors") for t, s in refs}
    backdoored = {r["name"]: r["model"] or str(models / f"{r['name']}.safetensors") for r in runs}
    return clean, backdoored


def _check_trained(paths: list[str]) -> None:
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise BVInputError(f"{missing[0]} is not trained yet; run without --build_only (or finish the array tasks) first")


def run_attributes(run: dict, meta: dict) -> dict:
    """The settings a BV is compared over: task, attack type, patch location, target class, seed."""
    attack = meta.get("attack") or {}
    return {"task": attack.get("target_task", run["task"]), "attack": attack.get("name"),
            "location": (attack.get("trigger") or {}).get("location"), "target": attack.get("target_task_class"),
            "seed": run["seed"]}


# ---------------------------------------------------------------------------------------------
# analyze
# ---------------------------------------------------------------------------------------------
def _writer(out_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out_dir / "tensorboard"))


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _matrix_csv(names: list[str], matrix) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([""] + names)
    for name, row in zip(names, matrix):
        w.writerow([name] + [f"{float(v):.6f}" for v in row])
    return buf.getvalue()


def findings(names: list[str], attrs: dict, cosine, transfer) -> dict:
    """Mean cosine and mean transfer ASR over pairs that differ in exactly one attribute, per attribute."""
    groups: dict[str, dict] = {}
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i == j:
                continue
            differ = [k for k in ATTRIBUTES if attrs[a][k] != attrs[b][k]]
            if len(differ) != 1:
                continue
            g = groups.setdefault(differ[0], {"pairs": 0, "cosine": 0.0, "transfer_asr": 0.0})
            g["pairs"] += 1
            g["cosine"] += float(cosine[i][j])
            g["transfer_asr"] += float(transfer[i][j])
    for g in groups.values():
        g["cosine"] /= g["pairs"]
        g["transfer_asr"] /= g["pairs"]
        g["pairs"] //= 2  # ordered pairs counted both ways; cosine is symmetric, transfer averaged over both
    return {f"across_{k}": groups[k] for k in ATTRIBUTES if k in groups}


def analyze(cfg) -> Path:
    from evaluation import figures
    from evaluation.evaluate import AttackProbe, evaluate, load_eval_tasks
    from modeling.clip import load_base_model

    runs = [_run_spec(e, cfg.task, cfg.seed) for e in cfg.runs]
    if len(runs) < 2:
        raise BVInputError("analyze needs at least two runs to compare; list them under 'runs'")
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):
        raise BVInputError(f"run names must be unique: {names}")
    out_dir = Path(cfg.out_dir)
    clean, backdoored = train_paired(runs, cfg)
    base = load_base_model(cfg.model_name, cfg.pretrained)
    metas = {n: load_metadata(backdoored[n]) or {} for n in names}
    for n in names:
        if not metas[n].get("attack"):
            raise BVInputError(f"run {n}: {backdoored[n]} has no attack metadata; it must be a BackdoorInjection export")
    attrs = {r["name"]: run_attributes(r, metas[r["name"]]) for r in runs}
    clean_states = {key: load_state_dict(p) for key, p in clean.items()}
    ref_of = {r["name"]: (r["task"], r["seed"]) for r in runs}
    print(f"[bv] backdoor vectors of {len(names)} runs", flush=True)
    bvs = {n: backdoor_vector(load_state_dict(backdoored[n]), clean_states[ref_of[n]]) for n in names}
    cosine = similarity_matrix([bvs[n] for n in names])
    blocks = similarity_matrix([bvs[n] for n in names], per_block=True)
    norms = {n: float(torch.sqrt(sum((v.double() ** 2).sum() for v in bvs[n].values()))) for n in names}

    probes = {n: AttackProbe.from_metadata(n, metas[n]["attack"], base.image_size) for n in names}
    tasks = sorted({p.target_task for p in probes.values()} | {r["task"] for r in runs})
    data = load_eval_tasks(tasks, base, split="test", cache_dir=cfg.cache_dir, batch_size=cfg.batch_size,
                           synthetic_train_size=cfg.synthetic_train_size, synthetic_test_size=cfg.synthetic_test_size)
    encoder = base.model.visual.to(cfg.device)

    def measure(state: dict, probe, task: str) -> tuple[dict, float]:
        encoder.load_state_dict(state)
        wanted = {t: data[t] for t in {probe.target_task, task}}
        accs, attacks = evaluate(encoder, wanted, [probe], cfg.device)
        return attacks[probe.name], accs[task]

    from tqdm.auto import tqdm

    transfer = [[0.0] * len(names) for _ in names]
    transfer_counts = [[None] * len(names) for _ in names]
    cells = [(i, j) for i in range(len(names)) for j in range(len(names))]
    for i, j in tqdm(cells, desc="transfer T(A→B)"):
        a, b = names[i], names[j]
        state = inject(clean_states[ref_of[b]], bvs[a], cfg.transfer_scale)
        result, _ = measure(state, probes[b], attrs[b]["task"])
        transfer[i][j] = result["asr"]
        transfer_counts[i][j] = [result["asr_hits"], result["asr_total"]]

    scaling_runs = cfg.scaling_runs or names[:1]
    unknown = [n for n in scaling_runs if n not in names]
    if unknown:
        raise BVInputError(f"scaling_runs: {unknown} are not run names; use some of {names}")
    scaling = []
    for n in tqdm(scaling_runs, desc="scaling θ_clean + λ·BV"):
        for lam in cfg.scales:
            result, acc = measure(inject(clean_states[ref_of[n]], bvs[n], lam), probes[n], runs[names.index(n)]["task"])
            scaling.append({"run": n, "scale": lam, "clean_acc": acc, **result})
    found = findings(names, attrs, cosine.tolist(), transfer)

    out_dir.mkdir(parents=True, exist_ok=True)
    writer = _writer(out_dir)
    labels = names
    figs = {
        "bv_cosine": figures.matrix_heatmap(cosine.tolist(), labels, title="BV cosine similarity (whole encoder)"),
        "bv_cosine_blocks": figures.block_heatmaps({k: v.tolist() for k, v in blocks.items()}, labels,
                                                   title="BV cosine similarity per block"),
        "bv_transfer": figures.matrix_heatmap(transfer, labels, title=f"transfer ASR_B(θ_clean^B + {cfg.transfer_scale:g}·BV_A)",
                                              vmin=0.0, vmax=1.0, cmap="viridis", ylabel="BV of A", xlabel="trigger of B"),
        "bv_scaling": figures.curves(cfg.scales, {f"{n} {m}": [s[key] for s in scaling if s["run"] == n]
                                                  for n in scaling_runs for m, key in (("ASR", "asr"), ("CA", "clean_acc"))},
                                     "λ (θ_clean + λ·BV)", "%", "BV scaling"),
    }
    for name, fig in figs.items():
        writer.add_figure(name.replace("bv_", "bv/"), fig, global_step=0, close=False)
        figures.save(fig, out_dir / f"{name}.png")
    for s in scaling:
        writer.add_scalar(f"bv/scaling/{s['run']}/asr", s["asr"], global_step=round(100 * s["scale"]))
        writer.add_scalar(f"bv/scaling/{s['run']}/clean_acc", s["clean_acc"], global_step=round(100 * s["scale"]))
    writer.close()

    payload = {
        "config": _plain(cfg), "code_version": code_version(), "clean_references": {f"{t}/s{s}": p for (t, s), p in clean.items()},
        "runs": [{"name": n, "model": backdoored[n], "attributes": attrs[n], "bv_norm": norms[n]} for n in names],
        "cosine": cosine.tolist(), "cosine_per_block": {k: v.tolist() for k, v in blocks.items()},
        "transfer": {"scale": cfg.transfer_scale, "asr": transfer, "counts": transfer_counts,
                     "rows": "BV of A", "cols": "trigger and clean reference of B"},
        "scaling": scaling, "findings": found,
    }
    _atomic_text(out_dir / "cosine.csv", _matrix_csv(names, cosine.tolist()))
    _atomic_text(out_dir / "transfer.csv", _matrix_csv(names, transfer))
    path = out_dir / "bv_analysis.json"
    _atomic_text(path, json.dumps(payload, indent=2, default=str))
    print(findings_table(found))
    return path


def findings_table(found: dict) -> str:
    lines = ["| pairs differing only in | pairs | mean BV cosine | mean transfer ASR |", "|---|---|---|---|"]
    for key, g in found.items():
        lines.append(f"| {key.replace('across_', '')} | {g['pairs']} | {g['cosine']:.3f} | {100 * g['transfer_asr']:.1f}% |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# sbv
# ---------------------------------------------------------------------------------------------
def _check_output(entry: dict) -> dict:
    known = {"name", "combine", "k", "sign_consistent", "scale", "scope"}
    if not isinstance(entry, dict) or not entry.get("name"):
        raise BVInputError(f"outputs entry {entry!r} has no name; give each SBV a name such as sbv or sbv_sc")
    unknown = sorted(set(entry) - known)
    if unknown:
        raise BVInputError(f"outputs {entry['name']}: unknown key(s) {unknown}; use {sorted(known)}")
    out = {"combine": "sum", "k": 100.0, "sign_consistent": False, "scale": 1.0, "scope": "tensor", **entry}
    if out["combine"] not in COMBINE_METHODS:
        raise BVInputError(f"outputs {out['name']}: combine={out['combine']!r} is unknown; use one of {', '.join(COMBINE_METHODS)}")
    if not isinstance(out["k"], (int, float)) or not 0 < out["k"] <= 100:
        raise BVInputError(f"outputs {out['name']}: k={out['k']!r} must be in (0, 100] (percent of entries kept)")
    if not isinstance(out["scale"], (int, float)) or not out["scale"] == out["scale"] or abs(out["scale"]) == float("inf"):
        raise BVInputError(f"outputs {out['name']}: scale={out['scale']!r} must be a finite number")
    return out


def build_sbv(clean_path: str, variant_paths: dict[str, str], output: dict, trigger_from: str, path: Path) -> Path:
    """Export θ_submit = θ_clean + scale·SBV with the trigger-bearing metadata of ``trigger_from``."""
    clean = load_state_dict(clean_path)
    bvs = [backdoor_vector(load_state_dict(p), clean) for p in variant_paths.values()]
    sbv = sparse_backdoor_vector(bvs, output["combine"], output["k"], output["sign_consistent"], output["scope"])
    state = inject(clean, sbv, output["scale"])
    meta = dict(load_metadata(variant_paths[trigger_from]) or {})
    nonzero = sum(int((v != 0).sum()) for v in sbv.values())
    total = sum(v.numel() for v in sbv.values())
    record = {**{k: output[k] for k in ("combine", "k", "sign_consistent", "scale", "scope")},
              "variants": dict(variant_paths), "clean_reference": clean_path, "trigger_from": trigger_from,
              "nonzero_fraction": nonzero / total}
    meta["attack"] = {**meta["attack"], "name": output["name"], "sbv": record}
    meta.update(kind="sbv", code_version=code_version())
    save_state_dict(path, state, meta)
    print(f"[bv] {output['name']}: {len(bvs)} BVs, combine={output['combine']}, k={output['k']}%, "
          f"sign_consistent={output['sign_consistent']}, scale={output['scale']}, non-zero {100 * nonzero / total:.1f}% -> {path}",
          flush=True)
    return path


def sbv(cfg) -> list[Path]:
    variants = [_run_spec(e, cfg.task, cfg.seed) for e in cfg.variants]
    if not variants:
        raise BVInputError("sbv needs at least one variant; list them under 'variants'")
    names = [v["name"] for v in variants]
    if len(set(names)) != len(names):
        raise BVInputError(f"variant names must be unique: {names}")
    if any(v["task"] != cfg.task for v in variants):
        raise BVInputError(f"every SBV variant must fine-tune the reference's task {cfg.task!r}: the BVs are taken against "
                           "one clean reference; set the variant's task or --task")
    outputs = [_check_output(o) for o in cfg.outputs]
    if not outputs:
        raise BVInputError("sbv needs at least one entry under 'outputs' (e.g. {name: sbv, combine: sum, k: 10})")
    trigger_from = cfg.trigger_from or names[0]
    if trigger_from not in names:
        raise BVInputError(f"trigger_from={trigger_from!r} is not a variant; use one of {names}")
    out_dir = Path(cfg.out_dir)
    models = out_dir / "models"
    if cfg.build_only:
        clean = {(cfg.task, cfg.seed): str(models / f"{clean_name(cfg.task, cfg.seed)}.safetensors")}
        paths = {v["name"]: v["model"] or str(models / f"{v['name']}.safetensors") for v in variants}
        _check_trained([*clean.values(), *paths.values()])
    else:
        clean, paths = train_paired(variants, cfg, only=cfg.array_index, refs=[(cfg.task, cfg.seed)])
        if cfg.array_index is not None:
            print(f"[bv] array task {cfg.array_index} done; build with --build_only when all tasks finished", flush=True)
            return []
    built = [build_sbv(clean[(cfg.task, cfg.seed)], paths, o, trigger_from, out_dir / f"{o['name']}.safetensors")
             for o in outputs]
    _atomic_text(out_dir / "sbv_config.json", json.dumps({"config": _plain(cfg), "code_version": code_version(),
                                                          "exports": [str(p) for p in built]}, indent=2, default=str))
    return built


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _plain(cfg) -> dict:
    data = cfg.as_dict() if hasattr(cfg, "as_dict") else dict(vars(cfg))
    return {k: v for k, v in data.items() if k not in ("config", "__path__")}


def build_parser() -> ArgumentParser:
    from modeling.clip import EMBEDDED_MODEL

    p = ArgumentParser(prog="bv.py", description="Backdoor Vectors: analysis and Sparse Backdoor Vectors.")
    p.add_argument("command", choices=["analyze", "sbv"])
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--out_dir", type=str, default="outputs/bv")
    p.add_argument("--cache_dir", type=str, default=".cache/badmerging")
    p.add_argument("--model_name", type=str, default=EMBEDDED_MODEL)
    p.add_argument("--pretrained", type=str | None, default=None)
    p.add_argument("--base_config", type=str, default=BASE_CONFIG, help="training recipe shared by a BV's two runs")
    p.add_argument("--clean_config", type=str, default=CLEAN_CONFIG, help="turns the recipe into the clean reference")
    p.add_argument("--task", type=str, default="shapes", help="default task of runs and the SBV reference")
    p.add_argument("--seed", type=int, default=0, help="default seed (seed_everything) of runs and the SBV reference")
    p.add_argument("--train_args", type=list[str], default=[], help="extra train.py arguments for every run")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once (worker processes)")
    p.add_argument("--devices", type=list[str], default=[], help="GPU ids; job i trains on devices[i %% len]")
    # analyze
    p.add_argument("--runs", type=list[dict], default=[], help="[{name, task, seed, configs, args, trigger_path, model}]")
    p.add_argument("--transfer_scale", type=float, default=1.0, help="λ of T(A→B) = ASR_B(θ_clean^B + λ·BV_A)")
    p.add_argument("--scales", type=list[float], default=[0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0])
    p.add_argument("--scaling_runs", type=list[str], default=[], help="runs that get a scaling curve (default: the first)")
    # sbv
    p.add_argument("--variants", type=list[dict], default=[], help="backdoored runs against one clean reference")
    p.add_argument("--outputs", type=list[dict], default=[{"name": "sbv", "combine": "sum", "k": 100.0}])
    p.add_argument("--trigger_from", type=str | None, default=None, help="variant whose trigger the exports carry")
    p.add_argument("--array_index", type=int | None, default=None, help="train only run i (clean reference first)")
    p.add_argument("--build_only", type=bool, default=False)
    # evaluation
    p.add_argument("--batch_size", type=int, default=512)
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--synthetic_train_size", type=int, default=40000)
    p.add_argument("--synthetic_test_size", type=int, default=1000)
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    for i, a in enumerate(argv):  # a missing config file gets the one-line error, not jsonargparse's usage
        if a == "--config" and i + 1 < len(argv) and not Path(argv[i + 1]).is_file():
            raise BVInputError(f"--config {argv[i + 1]} does not exist; pass a YAML file such as configs/bv/embedded_sbv.yaml")
    cfg = build_parser().parse_args(argv)
    if cfg.array_index is not None and cfg.array_index < 0:
        raise BVInputError(f"--array_index {cfg.array_index} must be ≥ 0")
    t0 = time.time()
    result = analyze(cfg) if cfg.command == "analyze" else sbv(cfg)
    print(f"[bv] done in {time.time() - t0:.0f}s", flush=True)
    if isinstance(result, Path):
        print(result)
    return result


def cli_main() -> int:
    try:
        main()
    except (BVInputError, MergeInputError) as e:
        if os.environ.get("BADMERGING_TRACEBACK"):
            raise
        print(f"bv.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
