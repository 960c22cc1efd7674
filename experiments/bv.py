"""Backdoor Vectors (docs/design.md §10) on the experiment engine: paired runs, BV similarity / transfer / scaling, SBV.

**Paired runs** are engine trainings (experiments.graph.training_recipe: one key rule, one artifact cache):

    clean reference of (task, seed) = base_config + clean_config        at that seed
    run                              = base_config + its configs + args  at its seed   (+ train_args for both)

so BV = θ_bd − θ_clean isolates the attack (both draw the identical clean batch stream; the poisoning has its
own generator), and a run with the recipe of a main-job training (``pipeline.py``) has its key and reuses it. A
``trigger_path`` file input is keyed by its content — by the key of the trigger node it came from when it is
that node's artifact in the cache, so a main-job trigger keeps the main job's keys. ``model:`` names a trained
file instead of a recipe. Trained models are linked as ``<out_dir>/models/<name>.safetensors``.

**analyze** measures transfer T(A→B) = ASR_B(θ_clean^B + λ·BV_A) (B's trigger, B's target task) and the
scaling curves θ_clean + λ·BV through the evaluation API (evaluation.merge_eval.evaluate_merges: the injected
weights as a model carrying B's export metadata, its individual rows); writes bv_analysis.json, cosine.csv,
transfer.csv, four PNGs and TensorBoard figures. **sbv** builds θ_clean + scale·SBV per ``outputs`` entry with
``attacks.build_vector_attack``. **variants** runs a spec whose defenses are IBVS configurations (the main job's
engine and cache) and writes their ASR / CA trade-off (``write_variant_outputs``). **detect** scores incoming models
with the defender's own BVs (merging.detection) and merges without the flagged ones through the evaluation API.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from experiments.cli import UserError
from experiments.graph import Node, RunOptions, training_recipe
from experiments.spec import Base, ExperimentSpec, Training
from experiments.sweep import write_text_atomic

__all__ = ["ATTRIBUTES", "BASE_CONFIG", "CLEAN_CONFIG", "BVInputError", "Run", "analyze", "clean_name", "detect",
           "file_input_key", "findings", "paired_nodes", "parse_runs", "run_attributes", "sbv", "tradeoff_points",
           "train_paired", "variants", "write_variant_outputs"]

BASE_CONFIG = "configs/experiment/embedded_injection.yaml"
CLEAN_CONFIG = "configs/bv/embedded_clean_reference.yaml"
ATTRIBUTES = ("task", "attack", "location", "target", "seed")
RUN_KEYS = ("name", "task", "seed", "configs", "args", "trigger_path", "model")


class BVInputError(UserError):
    """A bv.py input that cannot be used; the one-line message names it and the fix."""


@dataclass
class Run:
    """A backdoored run of a config (``runs`` / ``variants``): a recipe to train, or a trained ``model`` file."""

    name: str
    task: str
    seed: int = 0
    configs: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    trigger_path: str | None = None
    model: str | None = None


def clean_name(task: str, seed: int) -> str:
    return f"clean_{task}_s{seed}"


# ---------------------------------------------------------------------------------------------
# Runs: checked before any training
# ---------------------------------------------------------------------------------------------
def parse_runs(entries: list, default_task: str, default_seed: int, what: str = "runs") -> list[Run]:
    """Config entries -> Runs: unique names, known keys, existing files, trained models that are attack exports."""
    from merging.io import load_metadata

    runs = []
    for entry in entries:
        if not isinstance(entry, dict) or not entry.get("name"):
            raise BVInputError(f"{what}: {entry!r} has no name; give every run a unique 'name'")
        unknown = sorted(set(entry) - set(RUN_KEYS))
        if unknown:
            raise BVInputError(f"run {entry['name']}: unknown key(s) {unknown}; use {sorted(RUN_KEYS)}")
        run = Run(**{"task": default_task, "seed": default_seed, **entry})
        run.args = [str(a) for a in run.args]
        if isinstance(run.seed, bool) or not isinstance(run.seed, int) or run.seed < 0:
            raise BVInputError(f"run {run.name}: seed={run.seed!r} must be a non-negative integer")
        for path in run.configs + [p for p in (run.trigger_path, run.model) if p]:
            if not Path(path).is_file():
                raise BVInputError(f"run {run.name}: {path} does not exist; fix the path in the config")
        if run.model and not (load_metadata(run.model) or {}).get("attack"):
            raise BVInputError(f"run {run.name}: {run.model} has no attack metadata; it must be a BackdoorInjection export")
        runs.append(run)
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise BVInputError(f"{what} names must be unique: {names}")
    return runs


# ---------------------------------------------------------------------------------------------
# Paired runs as engine trainings
# ---------------------------------------------------------------------------------------------
def file_input_key(path: str, artifacts: str) -> str:
    """An input file's key: the key of the engine node whose artifact it is (checked by content), else its digest."""
    from experiments.cache import ArtifactCache, file_digest
    from merging.io import load_metadata

    digest = file_digest(path)
    key = (load_metadata(path) or {}).get("engine_key")
    cached = ArtifactCache(artifacts).path(str(key)) / "artifact.safetensors" if key else None
    if cached is not None and cached.is_file() and file_digest(cached) == digest:
        return str(key)
    return f"file:{digest[:16]}"


def _device_args(index: int, devices: list) -> list[str]:
    """Pin job ``index`` to one of ``devices`` (GPU ids); nothing on CPU. Not part of any key."""
    if not devices:
        return []
    return ["--trainer.accelerator", "gpu", "--trainer.devices", f"[{devices[index % len(devices)]}]"]


def _trainings(runs: list[Run], cfg, refs: list[tuple[str, int]]) -> list[tuple[Training, dict[str, str]]]:
    """(training, file inputs) of every clean reference in ``refs``, then of every run to train."""
    out = [(Training(name=clean_name(t, s), task=t, configs=[cfg.base_config, cfg.clean_config], seed=s), {})
           for t, s in refs]
    for r in runs:
        if not r.model:
            out.append((Training(name=r.name, task=r.task, configs=[cfg.base_config, *r.configs], overrides=list(r.args),
                                 seed=r.seed), {"trigger_path": r.trigger_path} if r.trigger_path else {}))
    return out


def options_of(cfg) -> RunOptions:
    progress = not (os.environ.get("CI") or os.environ.get("BADMERGING_JOB_WORKER")) and cfg.jobs == 1
    return RunOptions(out_dir=str(cfg.out_dir), cache_dir=cfg.cache_dir, progress=progress,
                      train_overrides=[str(a) for a in cfg.train_args])


def paired_nodes(runs: list[Run], cfg, refs: list[tuple[str, int]] | None = None) -> dict[str, Node]:
    """The engine's train nodes of the clean references (of ``refs``, default: every run's (task, seed)) and runs."""
    from experiments.cache import recipe_key

    for path in (cfg.base_config, cfg.clean_config):
        if not Path(path).is_file():
            raise BVInputError(f"{path} does not exist; fix --base_config / --clean_config")
    refs = sorted(refs or {(r.task, r.seed) for r in runs})
    options = options_of(cfg)
    trainings = _trainings(runs, cfg, refs)
    spec = ExperimentSpec(name="bv", tasks=sorted({t.task for t, _ in trainings}),
                          base=Base(cfg.model_name, cfg.pretrained), trainings=[t for t, _ in trainings])
    nodes = {}
    for i, (t, files) in enumerate(trainings):
        recipe = training_recipe(spec, t, options, {arg: file_input_key(p, options.artifacts) for arg, p in files.items()})
        flags = [x for arg, p in files.items() for x in (f"--model.init_args.{arg}", p)]
        payload = {"name": t.name, "kind": t.kind, "task": t.task, "configs": list(t.configs), "inputs": {},
                   "overrides": [*flags, *recipe["overrides"], *_device_args(i, list(cfg.devices))]}
        nodes[f"train:{t.name}"] = Node(f"train:{t.name}", "train", recipe_key(recipe), recipe, payload=payload)
    return nodes


def train_paired(runs: list[Run], cfg, only: int | None = None, refs: list[tuple[str, int]] | None = None,
                 trained_only: bool = False) -> tuple[dict, dict]:
    """Train (or find in the cache) every clean reference and run; ``only`` = one index into [clean references
    (sorted), runs...] (a SLURM array task); ``trained_only``: train nothing, refuse what the cache lacks.

    Returns ({(task, seed): clean path}, {run name: backdoored path}), paths under ``<out_dir>/models``.
    """
    from experiments.cache import ArtifactCache
    from experiments.executors import LocalExecutor
    from experiments.nodes import artifact_path, link_model

    nodes = paired_nodes(runs, cfg, refs)
    options = options_of(cfg)
    cache = ArtifactCache(options.artifacts)
    if only is not None:
        if not 0 <= only < len(nodes):
            raise BVInputError(f"--array_index {only} is out of range: this config has {len(nodes)} runs "
                               f"(0..{len(nodes) - 1})")
        nodes = dict([list(nodes.items())[only]])
    if trained_only:
        missing = [n for n in nodes.values() if not cache.done(n.key)]
        if missing:
            raise BVInputError(f"{missing[0].payload['name']} ({missing[0].key}) is not trained yet in {options.artifacts}; "
                               "run without --build_only (or finish the array tasks) first")
    else:
        LocalExecutor(cfg.jobs).run(nodes, options)
    models = Path(cfg.out_dir) / "models"
    paths = {n.payload["name"]: str(link_model(artifact_path(cache, n), models / f"{n.payload['name']}.safetensors"))
             for n in nodes.values()}
    refs = sorted(refs or {(r.task, r.seed) for r in runs})
    clean = {(t, s): paths.get(clean_name(t, s)) for t, s in refs}
    backdoored = {r.name: r.model or paths.get(r.name) for r in runs}
    return clean, backdoored


# ---------------------------------------------------------------------------------------------
# analyze
# ---------------------------------------------------------------------------------------------
def run_attributes(run: Run, meta: dict) -> dict:
    """The settings a BV is compared over: task, attack type, patch location, target class, seed."""
    attack = meta.get("attack") or {}
    return {"task": attack.get("target_task", run.task), "attack": attack.get("name"),
            "location": (attack.get("trigger") or {}).get("location"), "target": attack.get("target_task_class"),
            "seed": run.seed}


def findings(names: list[str], attrs: dict, cosine, transfer) -> dict:
    """Mean cosine and mean transfer ASR over pairs that differ in exactly one attribute, per attribute."""
    groups: dict[str, dict] = {}
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            differ = [k for k in ATTRIBUTES if attrs[a][k] != attrs[b][k]]
            if i == j or len(differ) != 1:
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


def findings_table(found: dict) -> str:
    lines = ["| pairs differing only in | pairs | mean BV cosine | mean transfer ASR |", "|---|---|---|---|"]
    for key, g in found.items():
        lines.append(f"| {key.replace('across_', '')} | {g['pairs']} | {g['cosine']:.3f} | {100 * g['transfer_asr']:.1f}% |")
    return "\n".join(lines)


class Measure:
    """ASR and clean accuracy of injected weights through the evaluation API: the weights, written with the
    metadata of the backdoored export whose trigger is measured, are one model's individual rows."""

    KEYS = ("asr", "asr_hits", "asr_total", "ra", "ra_hits", "ra_total", "clean_to_target", "clean_to_target_hits",
            "clean_to_target_total")

    def __init__(self, cfg, folder: Path):
        from evaluation.merge_eval import EvalCache

        self.cfg, self.folder, self.cache = cfg, folder, EvalCache()

    def __call__(self, state: dict, meta: dict) -> tuple[dict, float]:
        """({asr, counts, ...} of ``meta``'s trigger, clean accuracy on ``meta``'s task) of ``state``."""
        from evaluation.merge_eval import MergeEvalRequest, evaluate_merges
        from merging.io import save_state_dict

        path = self.folder / "measured.safetensors"
        save_state_dict(path, state, meta)
        c = self.cfg
        request = MergeEvalRequest(models=[str(path)], plan=[], zero_shot=False, individual=True, model_name=c.model_name,
                                   pretrained=c.pretrained, cache_dir=c.cache_dir, batch_size=c.batch_size, device=c.device,
                                   synthetic_train_size=c.synthetic_train_size, synthetic_test_size=c.synthetic_test_size)
        row = next(r for r in evaluate_merges(request, self.cache).rows if r.attack is not None)
        return {k: getattr(row, k) for k in self.KEYS}, row.clean_acc[meta["task"]]


def _measurements(cfg, names: list[str], runs: list[Run], bvs: dict, clean_states: dict, metas: dict) -> tuple:
    """Transfer matrix (ASR, counts) and scaling curves, each point one evaluation."""
    from tqdm.auto import tqdm

    from merging.backdoor_vectors import inject

    ref_of = {r.name: (r.task, r.seed) for r in runs}
    transfer = [[0.0] * len(names) for _ in names]
    counts = [[None] * len(names) for _ in names]
    scaling = []
    with tempfile.TemporaryDirectory(prefix="bv_measure.") as folder:
        measure = Measure(cfg, Path(folder))
        for i, j in tqdm([(i, j) for i in range(len(names)) for j in range(len(names))], desc="transfer T(A→B)"):
            a, b = names[i], names[j]
            result, _ = measure(inject(clean_states[ref_of[b]], bvs[a], cfg.transfer_scale), metas[b])
            transfer[i][j], counts[i][j] = result["asr"], [result["asr_hits"], result["asr_total"]]
        for n in tqdm(cfg.scaling_runs or names[:1], desc="scaling θ_clean + λ·BV"):
            for lam in cfg.scales:
                result, acc = measure(inject(clean_states[ref_of[n]], bvs[n], lam), metas[n])
                scaling.append({"run": n, "scale": lam, "clean_acc": acc, **result})
    return transfer, counts, scaling


def _write_figures(cfg, out_dir: Path, names: list[str], cosine, blocks: dict, transfer, scaling: list[dict]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from evaluation import figures

    scaling_runs = list(dict.fromkeys(s["run"] for s in scaling))
    figs = {
        "bv_cosine": figures.matrix_heatmap(cosine, names, title="BV cosine similarity (whole encoder)"),
        "bv_cosine_blocks": figures.block_heatmaps(blocks, names, title="BV cosine similarity per block"),
        "bv_transfer": figures.matrix_heatmap(transfer, names, title=f"transfer ASR_B(θ_clean^B + {cfg.transfer_scale:g}·BV_A)",
                                              vmin=0.0, vmax=1.0, cmap="viridis", ylabel="BV of A", xlabel="trigger of B"),
        "bv_scaling": figures.curves(cfg.scales, {f"{n} {m}": [s[key] for s in scaling if s["run"] == n]
                                                  for n in scaling_runs for m, key in (("ASR", "asr"), ("CA", "clean_acc"))},
                                     "λ (θ_clean + λ·BV)", "%", "BV scaling"),
    }
    writer = SummaryWriter(str(out_dir / "tensorboard"))
    for name, fig in figs.items():
        writer.add_figure(name.replace("bv_", "bv/"), fig, global_step=0, close=False)
        figures.save(fig, out_dir / f"{name}.png")
    for s in scaling:
        writer.add_scalar(f"bv/scaling/{s['run']}/asr", s["asr"], global_step=round(100 * s["scale"]))
        writer.add_scalar(f"bv/scaling/{s['run']}/clean_acc", s["clean_acc"], global_step=round(100 * s["scale"]))
    writer.close()


def analyze(cfg, config: dict) -> Path:
    """Cosine (whole / per block), transfer and scaling of the runs' BVs; returns bv_analysis.json's path.
    ``config``: the settings recorded in it."""
    from merging.backdoor_vectors import backdoor_vector, similarity_matrix
    from merging.io import load_metadata, load_state_dict
    from modeling.version import code_version

    runs = parse_runs(cfg.runs, cfg.task, cfg.seed)
    if len(runs) < 2:
        raise BVInputError("analyze needs at least two runs to compare; list them under 'runs'")
    names = [r.name for r in runs]
    unknown = [n for n in cfg.scaling_runs if n not in names]
    if unknown:
        raise BVInputError(f"scaling_runs: {unknown} are not run names; use some of {names}")
    clean, backdoored = train_paired(runs, cfg)
    metas = {n: load_metadata(backdoored[n]) or {} for n in names}
    for n in names:
        if not metas[n].get("attack"):
            raise BVInputError(f"run {n}: {backdoored[n]} has no attack metadata; it must be a BackdoorInjection export")
    attrs = {r.name: run_attributes(r, metas[r.name]) for r in runs}
    clean_states = {key: load_state_dict(p) for key, p in clean.items()}
    print(f"[bv] backdoor vectors of {len(names)} runs", flush=True)
    bvs = {r.name: backdoor_vector(load_state_dict(backdoored[r.name]), clean_states[(r.task, r.seed)]) for r in runs}
    cosine = similarity_matrix([bvs[n] for n in names]).tolist()
    blocks = {k: v.tolist() for k, v in similarity_matrix([bvs[n] for n in names], per_block=True).items()}
    norms = {n: float(torch.sqrt(sum((v.double() ** 2).sum() for v in bvs[n].values()))) for n in names}
    transfer, counts, scaling = _measurements(cfg, names, runs, bvs, clean_states, metas)
    found = findings(names, attrs, cosine, transfer)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_figures(cfg, out_dir, names, cosine, blocks, transfer, scaling)
    payload = {"config": config, "code_version": code_version(),
               "clean_references": {f"{t}/s{s}": p for (t, s), p in clean.items()},
               "runs": [{"name": n, "model": backdoored[n], "attributes": attrs[n], "bv_norm": norms[n]} for n in names],
               "cosine": cosine, "cosine_per_block": blocks,
               "transfer": {"scale": cfg.transfer_scale, "asr": transfer, "counts": counts,
                            "rows": "BV of A", "cols": "trigger and clean reference of B"},
               "scaling": scaling, "findings": found}
    write_text_atomic(out_dir / "cosine.csv", _matrix_csv(names, cosine))
    write_text_atomic(out_dir / "transfer.csv", _matrix_csv(names, transfer))
    path = out_dir / "bv_analysis.json"
    write_text_atomic(path, json.dumps(payload, indent=2, default=str))
    print(findings_table(found))
    return path


def _matrix_csv(names: list[str], matrix) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([""] + names)
    for name, row in zip(names, matrix):
        w.writerow([name] + [f"{float(v):.6f}" for v in row])
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# sbv
# ---------------------------------------------------------------------------------------------
def sbv(cfg, config: dict) -> list[Path]:
    """Train (or find) the clean reference and the variants, then build every ``outputs`` entry (SBV / SBV_SC);
    with ``array_index`` only that one training; with ``build_only`` only the builds (from the cache)."""
    from attacks import build_vector_attack
    from attacks.sbv import check_sbv_output
    from modeling.version import code_version

    variants = parse_runs(cfg.variants, cfg.task, cfg.seed, what="variants")
    if not variants:
        raise BVInputError("sbv needs at least one variant; list them under 'variants'")
    names = [v.name for v in variants]
    if any(v.task != cfg.task for v in variants):
        raise BVInputError(f"every SBV variant must fine-tune the reference's task {cfg.task!r}: the BVs are taken against "
                           "one clean reference; set the variant's task or --task")
    outputs = [check_sbv_output(o) for o in cfg.outputs]
    if not outputs:
        raise BVInputError("sbv needs at least one entry under 'outputs' (e.g. {name: sbv, combine: sum, k: 10})")
    trigger_from = cfg.trigger_from or names[0]
    if trigger_from not in names:
        raise BVInputError(f"trigger_from={trigger_from!r} is not a variant; use one of {names}")
    refs = [(cfg.task, cfg.seed)]
    clean, paths = train_paired(variants, cfg, only=None if cfg.build_only else cfg.array_index, refs=refs,
                                trained_only=cfg.build_only)
    if cfg.array_index is not None and not cfg.build_only:
        print(f"[bv] array task {cfg.array_index} done; build with --build_only true when all tasks finished", flush=True)
        return []
    out_dir = Path(cfg.out_dir)
    built = [build_vector_attack("sbv", clean[refs[0]], paths, o, trigger_from, out_dir / f"{o['name']}.safetensors")
             for o in outputs]
    write_text_atomic(out_dir / "sbv_config.json", json.dumps({"config": config, "code_version": code_version(),
                                                          "exports": [str(p) for p in built]}, indent=2, default=str))
    return built


# ---------------------------------------------------------------------------------------------
# variants: IBVS configurations on every attack and merge of a spec, their ASR / CA trade-off
# ---------------------------------------------------------------------------------------------
TRADEOFF_FIELDS = ("variant", "attack", "merge", "coefficient", "alpha", "selected", "mean_clean_acc", "delta_ca",
                   "asr", "asr_hits", "asr_total", "clean_to_target")
VARIANT_OUTPUTS = ("ibvs_tradeoff.csv", "ibvs_tradeoff.png", "ibvs_variants.md")


def family_of(variant: str) -> str:
    """The panel a variant is drawn in: its name up to the first '_' (k2_mean, k10_sum -> k)."""
    import re

    return re.sub(r"^k\d+$", "k", variant.split("_")[0])


def tradeoff_points(rows: list[dict]) -> list[dict]:
    """Per (defense, attack, merge, λ): the in-merge trigger's ASR and the mean CA at α = 0 (the undefended merge)
    and at every measured α, with ΔCA against the undefended merge and the α the selection rule picked."""
    def trigger(r):
        return isinstance(r.get("attack"), dict) and r["attack"].get("in_merge") and r.get("scenario") != "clean"

    plain = {(r["scenario"], r["merge"], r["coefficient"]): r for r in rows
             if trigger(r) and (r.get("defense") or "none") == "none"}
    points = []
    defended = [r for r in rows if trigger(r) and (r.get("defense") or "none") != "none"]
    for variant in dict.fromkeys(r["defense"] for r in defended):
        for key, base in plain.items():
            mine = sorted((r for r in defended if r["defense"] == variant and (r["scenario"], r["merge"], r["coefficient"]) == key),
                          key=lambda r: r["defense_alpha"])
            if not mine:
                continue
            for alpha, r in [(0.0, base)] + [(r["defense_alpha"], r) for r in mine]:
                points.append({"variant": variant, "attack": key[0], "merge": key[1], "coefficient": key[2], "alpha": alpha,
                               "selected": bool(r.get("defense_selected")) and r is not base,
                               "mean_clean_acc": r["mean_clean_acc"], "delta_ca": r["mean_clean_acc"] - base["mean_clean_acc"],
                               "asr": r["asr"], "asr_hits": r.get("asr_hits"), "asr_total": r.get("asr_total"),
                               "clean_to_target": r.get("clean_to_target")})
    return points


def _headline(points: list[dict], headline: float) -> tuple[str, float | None]:
    """(merge, λ) of the curves drawn: Task Arithmetic at the headline λ, else the first merge measured."""
    import math

    for p in points:
        if p["merge"] == "task_arithmetic" and p["coefficient"] is not None and math.isclose(p["coefficient"], headline):
            return p["merge"], p["coefficient"]
    return points[0]["merge"], points[0]["coefficient"]


def variants_table(points: list[dict], headline: float) -> str:
    """Markdown: at the drawn merge, per variant × attack the selected operating point (ASR % / ΔCA points, α); then
    per variant × attack the mean over every merge method at the selected α."""
    merge, coef = _headline(points, headline)
    variants = list(dict.fromkeys(p["variant"] for p in points))
    attacks = list(dict.fromkeys(p["attack"] for p in points))
    at = [p for p in points if p["merge"] == merge and p["coefficient"] == coef]
    lam = "" if coef is None else f" λ {coef:g}"
    title = (f"IBVS variants at {merge}{lam}, α selected on clean val data only: ASR % / ΔCA (points vs the "
             "undefended merge) (α)")
    out = [title, "", "| variant | " + " | ".join(attacks) + " |", "|---|" + "---|" * len(attacks)]
    undefended = {p["attack"]: p for p in at if p["alpha"] == 0}
    out.append("| undefended (ASR % / mean CA %) | " + " | ".join(
        f"{100 * undefended[a]['asr']:.1f} / {100 * undefended[a]['mean_clean_acc']:.1f}" if a in undefended else ""
        for a in attacks) + " |")

    def cell(p):
        return f"{100 * p['asr']:.1f} / {100 * p['delta_ca']:+.1f} ({p['alpha']:g})"

    for v in variants:
        chosen = {p["attack"]: p for p in at if p["variant"] == v and p["selected"]}
        out.append(f"| {v} | " + " | ".join(cell(chosen[a]) if a in chosen else "" for a in attacks) + " |")
    out += ["", "Mean over every merge method, each at its selected α: ASR % / ΔCA (points vs the undefended merge)", "",
            "| variant | " + " | ".join(attacks) + " |", "|---|" + "---|" * len(attacks)]
    for v in variants:
        cells = []
        for a in attacks:
            chosen = [p for p in points if p["variant"] == v and p["attack"] == a and p["selected"]]
            cells.append("" if not chosen else f"{100 * sum(p['asr'] for p in chosen) / len(chosen):.1f} / "
                         f"{100 * sum(p['delta_ca'] for p in chosen) / len(chosen):+.1f}")
        out.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def tradeoff_figure(points: list[dict], headline: float):
    """Rows attacks × columns families: mean CA against ASR over α (α = 0 the undefended end), the selected α a
    star; the family-less reference ``ibvs`` (dashed) in every panel."""
    from evaluation.figures import plt

    merge, coef = _headline(points, headline)
    at = [p for p in points if p["merge"] == merge and p["coefficient"] == coef]
    attacks = list(dict.fromkeys(p["attack"] for p in at))
    variants = list(dict.fromkeys(p["variant"] for p in at))
    families = list(dict.fromkeys(family_of(v) for v in variants if family_of(v) != "ibvs")) or ["ibvs"]
    fig, axes = plt.subplots(len(attacks), len(families), figsize=(3.2 * len(families), 2.8 * len(attacks)),
                             squeeze=False)
    for i, attack in enumerate(attacks):
        for j, family in enumerate(families):
            ax = axes[i][j]
            for v in variants:
                if family_of(v) not in (family, "ibvs"):
                    continue
                curve = [p for p in at if p["variant"] == v and p["attack"] == attack]
                style = "--" if family_of(v) == "ibvs" and family != "ibvs" else "-"
                line, = ax.plot([100 * p["asr"] for p in curve], [100 * p["mean_clean_acc"] for p in curve], style,
                                marker="o", markersize=3, label=v)
                for p in curve:
                    if p["selected"]:
                        ax.plot(100 * p["asr"], 100 * p["mean_clean_acc"], "*", markersize=11, color=line.get_color())
            ax.set_title(f"{attack} · {family}", fontsize=8)
            ax.set_xlabel("ASR (%)", fontsize=7)
            ax.set_ylabel("mean CA (%)", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.legend(fontsize=5)
    lam = "" if coef is None else f" λ {coef:g}"
    fig.suptitle(f"IBVS variants at {merge}{lam}: ASR / CA over α (★ the α chosen on clean val data)", fontsize=9)
    fig.tight_layout()
    return fig


def write_variant_outputs(out_dir: Path, rows: list[dict], headline: float) -> list[dict]:
    """ibvs_tradeoff.csv (every point), ibvs_tradeoff.png and ibvs_variants.md into ``out_dir``, as one set."""
    from evaluation.figures import plt
    from merging.io import OutputSet

    points = tradeoff_points(rows)
    if not points:
        raise BVInputError("the run measured no defended merge of an attack; give the spec attacks and defenses")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=TRADEOFF_FIELDS)
    w.writeheader()
    w.writerows(points)
    with OutputSet(out_dir, VARIANT_OUTPUTS, primary="ibvs_tradeoff.csv", error=BVInputError) as stage:
        (stage / "ibvs_tradeoff.csv").write_text(buf.getvalue())
        (stage / "ibvs_variants.md").write_text(variants_table(points, headline))
        fig = tradeoff_figure(points, headline)
        fig.savefig(stage / "ibvs_tradeoff.png", dpi=110)
        plt.close(fig)
    return points


def variants(cfg, config: dict) -> Path:
    """Run ``--spec`` (default configs/experiments/ibvs_variants.yaml) on the engine (cached), then its trade-off
    outputs; returns ibvs_variants.md's path."""
    from experiments.executors import LocalExecutor
    from experiments.run import run_experiment
    from experiments.spec import load_spec, restrict

    if cfg.methods not in ("all", "ta"):
        raise BVInputError(f"--methods={cfg.methods!r}; use all or ta")
    spec = restrict(load_spec(cfg.spec), ta_only=cfg.methods == "ta")
    if not spec.attacks or not any(s.defenses for s in spec.scenarios if s.models == "attack"):
        raise BVInputError(f"--spec {cfg.spec}: no attack scenario with defenses; variants compares defenses on attacks "
                           "(see configs/experiments/ibvs_variants.yaml)")
    from experiments.cli import check_output_path

    check_output_path(cfg.out_dir, "--out_dir", is_dir=True, error=BVInputError)
    options = RunOptions(out_dir=str(cfg.out_dir), cache_dir=cfg.cache_dir, quick=cfg.quick,
                         progress=options_of(cfg).progress, train_overrides=[str(a) for a in cfg.train_args])
    results = run_experiment(spec, options, LocalExecutor(cfg.jobs))
    rows = json.loads(results.read_text())["rows"]
    write_variant_outputs(Path(cfg.out_dir), rows, spec.headline_coefficient)
    print((Path(cfg.out_dir) / "ibvs_variants.md").read_text())
    return Path(cfg.out_dir) / "ibvs_variants.md"


# ---------------------------------------------------------------------------------------------
# detect: score incoming models with the defender's own BVs, before merging
# ---------------------------------------------------------------------------------------------
DETECT_OUTPUTS = ("detection.csv", "detection.json")
DETECT_RULE = ("flagged ⇔ modified z-score 0.6745·(score − median)/MAD > {t} over the models scored together "
               "(MAD = 0: 1.2533·mean absolute deviation); labels never enter it")


def _detect_models(cfg) -> list[dict]:
    """[{path, backdoored}] checked: files exist, each once, labels booleans (default: the export names an attack)."""
    from merging.io import load_metadata

    out, seen = [], set()
    for entry in cfg.detect_models:
        if not isinstance(entry, dict) or not entry.get("path"):
            raise BVInputError(f"detect_models: {entry!r} has no path; give {{path: <encoder>.safetensors, backdoored: bool}}")
        unknown = sorted(set(entry) - {"path", "backdoored"})
        if unknown:
            raise BVInputError(f"detect_models: {entry['path']}: unknown key(s) {unknown}; use path and backdoored")
        path = str(entry["path"])
        if not Path(path).is_file():
            raise BVInputError(f"detect_models: {path} does not exist; fix the path (run the job that exports it first)")
        if os.path.realpath(path) in seen:
            raise BVInputError(f"detect_models: {path} is listed twice; list each model once")
        seen.add(os.path.realpath(path))
        label = entry.get("backdoored", bool((load_metadata(path) or {}).get("attack")))
        if not isinstance(label, bool):
            raise BVInputError(f"detect_models: {path}: backdoored={label!r} must be true or false")
        out.append({"path": path, "backdoored": label})
    if not out:
        raise BVInputError("detect needs models to score; list them under detect_models")
    return out


def _detect_merges(cfg, known: set[str]) -> list[dict]:
    from evaluation.merge_eval import validate_plan_entry
    from experiments.cli import one_line

    merges, names = [], set()
    for entry in cfg.detect_merges:
        if not isinstance(entry, dict) or not entry.get("name") or not isinstance(entry.get("models"), list):
            raise BVInputError(f"detect_merges: {entry!r} needs a name and a list of models")
        if entry["name"] in names:
            raise BVInputError(f"detect_merges: {entry['name']} is defined twice; give every merge a unique name")
        names.add(entry["name"])
        models = [str(m) for m in entry["models"]]
        missing = [m for m in models if m not in known]
        if missing:
            raise BVInputError(f"detect_merges: {entry['name']}: {missing[0]} is not one of detect_models; list it there "
                               "(its score is the one the merge reads)")
        for e in cfg.detect_plan:
            try:
                validate_plan_entry(e, len(models))
            except (ValueError, TypeError) as err:
                raise BVInputError(f"detect_plan: {one_line(err)}") from None
        merges.append({"name": entry["name"], "models": models})
    return merges


def _merge_summary(rows, models: list[str], kept: list[str]) -> list[dict]:
    """Per merge row: mean CA and the ASR of every trigger measured on it."""
    out = []
    for r in rows:
        if r.merge in ("individual", "zero-shot") or r.attack is not None or r.defense != "none":
            continue
        triggers = {x.attack.label: {"asr": x.asr, "asr_hits": x.asr_hits, "asr_total": x.asr_total,
                                    "in_merge": x.attack.in_merge}
                    for x in rows if x.attack is not None and x.merge == r.merge and x.coefficient == r.coefficient}
        out.append({"merge": r.merge, "coefficient": r.coefficient, "models": kept, "mean_clean_acc": r.mean_clean_acc,
                    "clean_acc": r.clean_acc, "triggers": triggers})
    return out


def detect(cfg, config: dict) -> Path:
    """Score every model of ``detect_models`` with the defender's own BVs (merging.detection), report the ROC AUC of
    the scores for the given labels, then merge each ``detect_merges`` group as it is and with its flagged models
    dropped (flags within the group) through the evaluation API; returns detection.json's path."""
    from defenses.ibvs import defender_pairs
    from evaluation.inputs import check_base, model_metadata, task_of
    from evaluation.merge_eval import EvalCache, MergeEvalRequest, evaluate_merges
    from merging.backdoor_vectors import backdoor_vector
    from merging.detection import (
        AGGREGATES,
        flag_outliers,
        model_score,
        modified_z_scores,
        roc_auc,
    )
    from merging.io import MergeInputError, OutputSet, load_metadata, load_state_dict
    from merging.streaming import validate_inputs
    from merging.task_vectors import task_vector
    from modeling.version import code_version

    defender = cfg.defender or {}
    if not isinstance(defender, dict) or set(defender) != {"clean", "backdoored"}:
        raise BVInputError(f"defender={defender!r} must be {{clean: <encoder>, backdoored: <encoder or list>}}, the "
                           "defender's own pair(s)")
    try:
        pairs = defender_pairs(defender["clean"], defender["backdoored"], "defender.clean", "defender.backdoored")
    except MergeInputError as e:
        raise BVInputError(str(e)) from None
    for path in dict.fromkeys(p for pair in pairs for p in pair):
        if not Path(path).is_file():
            raise BVInputError(f"defender: {path} does not exist; pass the defender's own exported encoders")
    if cfg.detect_aggregate not in AGGREGATES:
        raise BVInputError(f"--detect_aggregate={cfg.detect_aggregate!r}; use one of {', '.join(AGGREGATES)}")
    if not (cfg.detect_threshold > 0 and cfg.detect_threshold < float("inf")):
        raise BVInputError(f"--detect_threshold={cfg.detect_threshold!r} must be a finite number > 0 (3.5 is usual)")
    models = _detect_models(cfg)
    merges = _detect_merges(cfg, {m["path"] for m in models})
    out_dir = Path(cfg.out_dir)
    from experiments.cli import check_output_path

    check_output_path(out_dir, "--out_dir", is_dir=True, error=BVInputError)

    cache = EvalCache()
    base, theta_pre = cache.base(cfg.model_name, cfg.pretrained)
    defender_paths = list(dict.fromkeys(p for pair in pairs for p in pair))
    paths = [m["path"] for m in models]
    for path in defender_paths + paths:
        check_base(path, model_metadata(path), base.base_id)
    validate_inputs(theta_pre, defender_paths, pretrained_name=f"θ_pre ({base.base_id})")
    validate_inputs(theta_pre, paths, pretrained_name=f"θ_pre ({base.base_id})")
    states = {p: load_state_dict(p) for p in defender_paths}
    bvs = [backdoor_vector(states[b], states[c]) for c, b in pairs]
    references = [task_vector(states[c], theta_pre) for c, _ in pairs] if cfg.detect_project_out else None
    scored = {}
    for m in models:
        score, blocks = model_score(task_vector(load_state_dict(m["path"]), theta_pre), bvs, cfg.detect_aggregate,
                                    references)
        scored[m["path"]] = {**m, "task": task_of(m["path"], model_metadata(m["path"]), None), "score": score,
                             "blocks": blocks}
    scores = [scored[p]["score"] for p in paths]
    labels = [scored[p]["backdoored"] for p in paths]
    for p, z, flag in zip(paths, modified_z_scores(scores), flag_outliers(scores, cfg.detect_threshold)):
        scored[p].update(z=z, flagged=flag)
    both = any(labels) and not all(labels)
    auc = roc_auc(scores, labels) if both else None
    blocks = list(scored[paths[0]]["blocks"])
    block_auc = {b: roc_auc([scored[p]["blocks"][b] for p in paths], labels) for b in blocks} if both else {}
    confusion = {k: sum(1 for p in paths if (scored[p]["flagged"], scored[p]["backdoored"]) == v)
                 for k, v in (("true_positive", (True, True)), ("false_positive", (True, False)),
                              ("false_negative", (False, True)), ("true_negative", (False, False)))}

    merged = []
    request = {"plan": list(cfg.detect_plan), "zero_shot": False, "individual": False, "model_name": cfg.model_name,
               "pretrained": cfg.pretrained, "cache_dir": cfg.cache_dir, "batch_size": cfg.batch_size,
               "device": cfg.device, "synthetic_train_size": cfg.synthetic_train_size,
               "synthetic_test_size": cfg.synthetic_test_size}
    for group in merges:
        group_scores = [scored[p]["score"] for p in group["models"]]
        flags = flag_outliers(group_scores, cfg.detect_threshold)
        kept = [p for p, f in zip(group["models"], flags) if not f]
        dropped = [p for p, f in zip(group["models"], flags) if f]
        tasks = list(dict.fromkeys(scored[p]["task"] for p in group["models"]))
        print(f"[bv] detect: merge {group['name']}: dropping {[Path(p).stem for p in dropped] or 'none'}", flush=True)
        rows = evaluate_merges(MergeEvalRequest(models=group["models"], eval_tasks=tasks, **request), cache).rows
        entry = {"name": group["name"], "models": group["models"], "scores": group_scores,
                 "z": modified_z_scores(group_scores), "flagged": flags, "dropped": dropped,
                 "labels": [scored[p]["backdoored"] for p in group["models"]],
                 "all": _merge_summary(rows, group["models"], group["models"])}
        if dropped:
            probes = [p for p in dropped if (load_metadata(p) or {}).get("attack")]  # their triggers, measured still
            rows = evaluate_merges(MergeEvalRequest(models=kept, eval_tasks=tasks, probe_models=probes, **request),
                                   cache).rows
        entry["filtered"] = _merge_summary(rows, group["models"], kept)
        merged.append(entry)

    payload = {"config": config, "code_version": code_version(), "rule": DETECT_RULE.format(t=cfg.detect_threshold),
               "aggregate": cfg.detect_aggregate, "project_out_defender_clean": bool(cfg.detect_project_out),
               "defender_pairs": [list(p) for p in pairs],
               "roc_auc": auc, "roc_auc_per_block": block_auc, "flags_over_all_models": confusion,
               "models": [scored[p] for p in paths], "merges": merged}
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", "task", "backdoored", "score", "z", "flagged", *blocks])
    for p in paths:
        s = scored[p]
        w.writerow([p, s["task"], s["backdoored"], f"{s['score']:.6f}", f"{s['z']:.3f}", s["flagged"],
                    *[f"{s['blocks'][b]:.6f}" for b in blocks]])
    with OutputSet(out_dir, DETECT_OUTPUTS, primary="detection.json", error=BVInputError) as stage:
        (stage / "detection.csv").write_text(buf.getvalue())
        (stage / "detection.json").write_text(json.dumps(payload, indent=2, default=str))
    print(f"[bv] detect: ROC AUC {'n/a (one class only)' if auc is None else f'{auc:.3f}'} over {len(paths)} models; "
          f"flagged {confusion['true_positive']} of {sum(labels)} backdoored, {confusion['false_positive']} of "
          f"{len(labels) - sum(labels)} clean", flush=True)
    return out_dir / "detection.json"
