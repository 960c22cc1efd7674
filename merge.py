"""Merge exported image encoders and evaluate the merge: clean accuracy per task, mean, normalised.

    python merge.py --models m1.safetensors m2.safetensors --coefficients 0.1 0.2 0.3 --out_dir outputs/merge
    python merge.py --config configs/merge/embedded_ta.yaml
    python merge.py --models ... --coefficients 0.3 --export merged.safetensors --evaluate false

Inputs are safetensors state dicts of the image encoder (as ``train.py`` exports them); the JSON
metadata beside each file names its task and base model and is checked against the base (a warning
when absent). Results: ``<out_dir>/results.json`` (config, code version, rows), ``results.csv``, and a
markdown table on stdout. Row contract: ``merge``, ``coefficient``, ``attack``, ``defense``,
``clean_acc`` (task -> fraction), ``mean_clean_acc``, ``normalized_acc``, ``asr``, ``ra``,
``clean_to_target`` (+ their ``*_hits`` / ``*_total`` counts).

Backdoors: every input whose metadata carries an ``attack`` (``BackdoorInjection`` exports) is
measured on every merge with its own trigger, on its target task; ``--probe_models`` adds backdoored
models whose triggers are measured but which are *not* merged (a trigger's ASR on θ_pre and on the
all-clean merge); ``--probe_triggers`` adds stage-1 trigger files optimised on θ_pre alone (inherent
triggers, attack name ``inherent``). Each evaluated model gives one row with ``attack: "none"``
(clean accuracy) and one row per trigger measured, whose ``attack`` is the spec plus ``in_merge``.

Defense: ``--defense ibvs --ibvs_clean c.safetensors --ibvs_backdoored b.safetensors --ibvs_alphas 0.5 1 2``
(DESIGN §10) also evaluates θ_merged − α·BV_inj, BV_inj = θ_b − θ_c of the defender's own pair, for every
merge and α; those rows have ``defense: "ibvs"``, ``defense_alpha`` and ``defense_selected`` (the largest α
whose mean val accuracy stays within ``--ibvs_max_drop`` of the undefended merge: clean data only).

    python merge.py --models shapes_bd.safetensors digits.safetensors ... --coefficients 0.3 \
        --defense ibvs --ibvs_clean outputs/default/models/ibvs_clean.safetensors \
        --ibvs_backdoored outputs/default/models/ibvs_backdoored.safetensors --ibvs_alphas 0.5 1 1.5 2
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import warnings
from pathlib import Path

import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from tqdm.auto import tqdm

from merging.backdoor_vectors import ibvs_defend
from merging.io import MergeInputError, load_metadata, load_state_dict, metadata_path, read_header_metadata, save_state_dict
from merging.methods import build_plan, get_merge_method, method_hyperparameters
from merging.streaming import merge_files, validate_inputs
from merging.task_vectors import task_vector
from modeling.clip import EMBEDDED_MODEL, load_base_model
from modeling.version import code_version


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Merge exported image encoders and evaluate the merge.", prog="merge.py")
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--model_name", type=str, default=EMBEDDED_MODEL, help="open_clip model name of θ_pre")
    p.add_argument("--pretrained", type=str | None, default=None, help="pretrained tag or local weights of θ_pre")
    p.add_argument("--models", type=str, nargs="+", default=[], help="exported encoders (safetensors) to merge")
    p.add_argument("--probe_models", type=str, nargs="+", default=[],
                   help="backdoored exports whose triggers are measured on every row but which are not merged")
    p.add_argument("--probe_triggers", type=str, nargs="+", default=[],
                   help="stage-1 trigger files (optimised on θ_pre alone: inherent triggers) measured on every row")
    p.add_argument("--defense", type=str, default="none", help="none | ibvs (subtract α·BV_inj of the defender's own pair)")
    p.add_argument("--ibvs_clean", type=str | None, default=None, help="IBVS: the defender's clean fine-tune")
    p.add_argument("--ibvs_backdoored", type=str | None, default=None,
                   help="IBVS: the defender's self-backdoored fine-tune (same recipe and seed as --ibvs_clean)")
    p.add_argument("--ibvs_alphas", type=float, nargs="+", default=[1.0], help="IBVS: α values evaluated on every merge")
    p.add_argument("--ibvs_select", type=str | None, default="val",
                   help="'val': mark the largest α whose mean val clean accuracy drops ≤ --ibvs_max_drop (no attacker data); null: none")
    p.add_argument("--ibvs_max_drop", type=float, default=0.02, help="IBVS selection: allowed val accuracy drop (fraction)")
    p.add_argument("--tasks", type=str, nargs="+", default=None, help="task of each model (default: from metadata)")
    p.add_argument("--eval_tasks", type=str, nargs="+", default=None, help="tasks to evaluate (default: the models' tasks)")
    p.add_argument("--method", type=str, default="task_arithmetic", help="task_arithmetic, weight_average, ties, dare, breadcrumbs, consensus, regmean, adamerging")
    p.add_argument("--coefficients", type=float, nargs="+", default=[0.3], help="merge coefficients λ to evaluate")
    p.add_argument("--hparams", type=dict, default={}, help="other hyperparameters of the method, e.g. {k: 20}")
    p.add_argument("--select_on", type=str | None, default=None, help="'val': pick the coefficient with the best mean normalised accuracy on the val split")
    p.add_argument("--plan", type=list[dict] | None, default=None,
                   help="several methods in one table: a list of {name, method, coefficients, hparams, select_on, measure_attacks, defend} (see configs/merge/)")
    p.add_argument("--engine", type=str, default="auto", help="auto | memory | streaming (tensor by tensor from the files; auto above 1 GiB)")
    p.add_argument("--merge_threads", type=int | None, default=None, help="torch threads for the streaming engine (1 is fastest on busy machines)")
    p.add_argument("--val_max_examples", type=int | None, default=500, help="val examples per task for coefficient selection")
    p.add_argument("--gram_batch_size", type=int, default=128, help="RegMean: batch size of the train batches for Gram matrices")
    p.add_argument("--evaluate", type=bool, default=True)
    p.add_argument("--zero_shot", type=bool, default=True, help="also evaluate θ_pre (row merge=zero-shot)")
    p.add_argument("--individual", type=bool, default=True, help="also evaluate each model on its own task")
    p.add_argument("--export", type=str | None, default=None, help="write the merged weights here (needs one coefficient)")
    p.add_argument("--out_dir", type=str, default="outputs/merge")
    p.add_argument("--cache_dir", type=str, default=".cache/badmerging")
    p.add_argument("--data_dirs", type=dict[str, str], default={}, help="task -> local data directory")
    p.add_argument("--batch_size", type=int, default=512)
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--synthetic_train_size", type=int, default=40000, help="synthetic tasks: the renders the fine-tunes used (val is held out of train)")
    p.add_argument("--synthetic_test_size", type=int, default=1000)
    return p


def _task_of(path: str, meta: dict | None, given: str | None) -> str:
    if given:
        return given
    if meta and meta.get("task"):
        return meta["task"]
    raise MergeInputError(f"{path}: no metadata names its task; pass --tasks in the same order as --models")


def check_base(path: str, meta: dict | None, base_id: str) -> None:
    """Refuse a model fine-tuned from another base (naming both); warn when nothing says which base it came from."""
    if not meta:
        warnings.warn(f"{path}: no JSON metadata beside it; cannot verify its task or base model", stacklevel=2)
        return
    described = meta.get("base_model")
    theirs = described.get("base_id") if isinstance(described, dict) else None
    if not theirs:
        warnings.warn(f"{path}: its metadata names no base model; cannot verify that it was fine-tuned from {base_id}",
                      stacklevel=2)
    elif theirs != base_id:
        raise MergeInputError(f"{path} was fine-tuned from {theirs}, not from the base {base_id}; pass the matching "
                              "--model_name/--pretrained, or leave this model out")


def model_metadata(path: str) -> dict | None:
    """A model's metadata: the JSON sidecar, else the copy in its safetensors header (a file copied alone).

    Where both exist and name different base models, the model is refused: one of them was edited.
    """
    sidecar = load_metadata(path)
    header = read_header_metadata(path)  # also refuses a pickle or a corrupt file, naming it
    header = header if isinstance(header, dict) else None

    def base_of(meta: dict | None):
        described = meta.get("base_model") if meta else None
        return described.get("base_id") if isinstance(described, dict) else None

    if base_of(sidecar) and base_of(header) and base_of(sidecar) != base_of(header):
        raise MergeInputError(f"{path}: its sidecar {metadata_path(path)} names base {base_of(sidecar)} but its header "
                              f"names {base_of(header)}; one was edited, re-export the model")
    return sidecar if sidecar is not None else header


# -- validation of merge.py's arguments: cheap, before any work; each error names the argument and the fix --
ENGINES = ("auto", "memory", "streaming")
_NEGATION_OK = ("task_arithmetic",)  # λ < 0 negates a task there; for other methods it only flips the merged vector


def _check_output_location(path: str | os.PathLike, flag: str, *, is_dir: bool) -> None:
    """Refuse an output that cannot be created or written, without creating anything."""
    path = Path(path)
    if path.exists():
        if is_dir and not path.is_dir():
            raise MergeInputError(f"{flag} {path} is a file, not a directory; pass a directory")
        if not is_dir and path.is_dir():
            raise MergeInputError(f"{flag} {path} is a directory; pass a file path such as {path / 'merged.safetensors'}")
    probe = path if (is_dir and path.is_dir()) else path.parent
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise MergeInputError(f"{flag} {path} cannot be created: {probe} is a file, not a directory; pass another {flag}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise MergeInputError(f"{flag} {path} is not writable ({probe} refuses writes); pass another {flag}")


def _positive_int(flag: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MergeInputError(f"{flag}={value!r} must be a positive integer")


def _finite(where: str, name: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MergeInputError(f"{where}: {name}={value!r} must be a number") from None
    if not math.isfinite(number):
        raise MergeInputError(f"{where}: {name}={value!r} must be finite")
    return number


def _validate_data_method(name: str, method: str, hparams: dict) -> None:
    """RegMean / AdaMerging hyperparameters (their own code checks them again, but only after evaluation work)."""
    import inspect

    if method == "regmean":
        from merging.regmean import regmean_merge

        known = set(list(inspect.signature(regmean_merge).parameters)[3:]) | {"gram_batches"}
    else:
        known = {"granularity", "init", "lr", "steps"}
    unknown = sorted(set(map(str, hparams)) - known)
    if unknown:
        raise MergeInputError(f"{name}: unknown hyperparameter(s) {unknown}; {method} takes {sorted(known)}")
    for key in ("gram_batches", "steps"):
        if key in hparams:
            _positive_int(f"{name}: {key}", hparams[key])
    if "alpha" in hparams and not 0 <= _finite(name, "alpha", hparams["alpha"]) <= 1:
        raise MergeInputError(f"{name}: alpha={hparams['alpha']!r} must lie in [0, 1] (off-diagonal scale of the Grams)")
    if "init" in hparams and not 0 <= _finite(name, "init", hparams["init"]) <= 1:
        raise MergeInputError(f"{name}: init={hparams['init']!r} must lie in [0, 1] (λ is clamped there)")
    if "lr" in hparams and not _finite(name, "lr", hparams["lr"]) > 0:
        raise MergeInputError(f"{name}: lr={hparams['lr']!r} must be > 0")
    if "granularity" in hparams and hparams["granularity"] not in ("task", "layer"):
        raise MergeInputError(f"{name}: granularity={hparams['granularity']!r} must be 'task' or 'layer'")


def validate_entry(entry: dict, n_models: int) -> None:
    """One method of the run (``--method``/``--hparams``/``--coefficients`` or a ``--plan`` entry)."""
    if not isinstance(entry, dict) or not entry.get("method"):
        raise MergeInputError(f"--plan entry {entry!r} names no method; give each entry a 'method'")
    method = entry["method"]
    name = entry.get("name", method)
    hparams = entry.get("hparams") or {}
    if not isinstance(hparams, dict):
        raise MergeInputError(f"{name}: hparams={hparams!r} must be a mapping such as {{k: 20}}")
    coefficients = entry.get("coefficients")
    coefficients = [None] if coefficients is None else coefficients
    if not isinstance(coefficients, (list, tuple)) or not coefficients:
        raise MergeInputError(f"{name}: coefficients={coefficients!r} must be a non-empty list of numbers")
    coefficients = [None if c is None else _finite(name, "coefficient", c) for c in coefficients]
    if entry.get("select_on") not in (None, "val"):
        raise MergeInputError(f"{name}: select_on must be 'val' or null, got {entry['select_on']!r}")
    if method in DATA_METHODS:
        _validate_data_method(name, method, hparams)
        return
    canonical = get_merge_method(method).__name__  # unknown names fail here, listing the known ones
    defaults = method_hyperparameters(method)
    for c in coefficients:
        hp = {**defaults, **hparams}
        if c is not None and "coefficient" in defaults:
            hp["coefficient"] = c
        if "k" in hp and (canonical == "ties_merge" or str(hp.get("base", "")).lower() == "ties"):
            if not 0 < _finite(name, "k", hp["k"]) <= 100:
                raise MergeInputError(f"{name}: k={hp['k']!r} must lie in (0, 100] (percent of each task vector "
                                      "kept); TIES uses 20")
        build_plan(method, n_models, **hp)  # names the bad or unknown hyperparameter
        lam = hp.get("coefficient")
        if method.lower().replace("-", "_") not in _NEGATION_OK and isinstance(lam, (int, float)) and lam < 0:
            raise MergeInputError(f"{name}: coefficient={lam!r} is negative, which is meaningless for {method} (it flips "
                                  "the merged vector); use a coefficient > 0, or task_arithmetic with λ < 0 for negation")


def validate_config(cfg) -> None:
    """Every argument of a merge.py run that can be checked without loading weights, before any work."""
    from datamodules.tasks import get_task

    if not cfg.models:
        raise MergeInputError("no models given; pass --models a.safetensors b.safetensors ...")
    for flag, paths in (("--models", cfg.models), ("--probe_models", cfg.probe_models or [])):
        seen: dict[str, str] = {}
        for path in paths:
            if Path(path).is_dir():
                raise MergeInputError(f"{flag}: {path} is a directory; pass the exported .safetensors file in it")
            if not Path(path).is_file():
                raise MergeInputError(f"{flag}: {path} does not exist; pass exported encoders (.safetensors)")
            real = os.path.realpath(path)
            if real in seen:
                raise MergeInputError(f"{flag}: {path} is given twice (also as {seen[real]}); list each model once")
            seen[real] = path
    if cfg.tasks is not None and len(cfg.tasks) != len(cfg.models):
        raise MergeInputError(f"--tasks has {len(cfg.tasks)} entries for {len(cfg.models)} --models; give one task per model")
    for path in cfg.probe_triggers or []:
        if not Path(path).is_file():
            raise MergeInputError(f"--probe_triggers: {path} does not exist; pass a stage-1 trigger file (.safetensors)")
    validate_defense(cfg)
    for task in list(cfg.tasks or []) + list(cfg.eval_tasks or []) + list((cfg.data_dirs or {}).keys()):
        get_task(task)  # UnknownTaskError lists the known tasks
    for task, folder in (cfg.data_dirs or {}).items():
        if not Path(folder).is_dir():
            raise MergeInputError(f"--data_dirs: {folder} (task {task}) is not a directory; pass the task's local data folder")
    if cfg.engine not in ENGINES:
        raise MergeInputError(f"--engine={cfg.engine!r} is unknown; use one of {', '.join(ENGINES)}")
    for flag in ("batch_size", "gram_batch_size", "synthetic_train_size", "synthetic_test_size"):
        _positive_int(f"--{flag}", getattr(cfg, flag))
    _positive_int("--val_max_examples", cfg.val_max_examples, allow_none=True)
    _positive_int("--merge_threads", cfg.merge_threads, allow_none=True)
    entries = plan_entries(cfg)
    for entry in entries:
        validate_entry(entry, len(cfg.models))
    if cfg.export:
        if len(entries) != 1 or len(entries[0]["coefficients"] or [None]) != 1:
            raise MergeInputError("--export needs exactly one method and one coefficient; pass --coefficients λ")
        _check_output_location(cfg.export, "--export", is_dir=False)
    if cfg.evaluate:
        _check_output_location(cfg.out_dir, "--out_dir", is_dir=True)


DEFENSES = ("none", "ibvs")


def validate_defense(cfg) -> None:
    """--defense and its inputs: IBVS needs the defender's clean and self-backdoored fine-tunes and finite α ≥ 0."""
    if cfg.defense not in DEFENSES:
        raise MergeInputError(f"--defense={cfg.defense!r} is unknown; use one of {', '.join(DEFENSES)}")
    if cfg.defense != "ibvs":
        return
    for flag in ("ibvs_clean", "ibvs_backdoored"):
        path = getattr(cfg, flag)
        if not path:
            raise MergeInputError(f"--defense ibvs needs --{flag}: the defender's own "
                                  f"{'clean' if flag == 'ibvs_clean' else 'self-backdoored'} fine-tune (bv.py / pipeline.py train it)")
        if not Path(path).is_file():
            raise MergeInputError(f"--{flag}: {path} does not exist; pass an exported encoder (.safetensors)")
    if not cfg.ibvs_alphas:
        raise MergeInputError("--ibvs_alphas is empty; pass at least one α, e.g. --ibvs_alphas 0.5 1 2")
    for a in cfg.ibvs_alphas:
        if not (isinstance(a, (int, float)) and math.isfinite(a) and a >= 0):
            raise MergeInputError(f"--ibvs_alphas: α={a!r} must be a finite number ≥ 0 (0 = no defense)")
    if cfg.ibvs_select not in (None, "val"):
        raise MergeInputError(f"--ibvs_select must be 'val' or null, got {cfg.ibvs_select!r}")
    if not (math.isfinite(cfg.ibvs_max_drop) and 0 <= cfg.ibvs_max_drop <= 1):
        raise MergeInputError(f"--ibvs_max_drop={cfg.ibvs_max_drop!r} must be a fraction in [0, 1], e.g. 0.02")


def ibvs_vector(cfg, base) -> dict:
    """BV_inj = θ_defender_bd − θ_defender_clean, both checked against the base model."""
    from merging.backdoor_vectors import backdoor_vector

    for path in (cfg.ibvs_clean, cfg.ibvs_backdoored):
        meta = model_metadata(path)
        check_base(path, meta, base.base_id)
    validate_inputs(base.encoder_state_dict(), [cfg.ibvs_clean, cfg.ibvs_backdoored], pretrained_name=f"θ_pre ({base.base_id})")
    return backdoor_vector(load_state_dict(cfg.ibvs_backdoored), load_state_dict(cfg.ibvs_clean))


def trigger_probes(cfg, base) -> list:
    """AttackProbes of ``--probe_triggers``: stage-1 trigger files aimed at their task's target class."""
    from datamodules.triggers import load_trigger
    from evaluation.evaluate import AttackProbe

    probes = []
    for label, path in zip(_unique_labels(cfg.probe_triggers), cfg.probe_triggers):
        tensor, spec, meta = load_trigger(path)
        spec.check(base.image_size)
        try:
            task, target = meta["task"], int(meta["target_class"])
        except (KeyError, TypeError, ValueError):
            raise MergeInputError(f"--probe_triggers: {path} names no task/target_class; pass a stage-1 trigger file") from None
        attack = {"name": "inherent", "trigger": spec.to_dict(), "target_task": task, "target_task_class": target,
                  "target_name": meta.get("target_name"), "trigger_path": str(path), "mode": meta.get("mode")}
        probes.append(AttackProbe(f"inherent:{label}", tensor, spec, task, target, attack))
    return probes


def attack_label(attack) -> str:
    """'none', or the trigger's label with '(not merged)' when its model is not in the merge."""
    if isinstance(attack, str):
        return attack
    return attack.get("label", attack.get("name", "?")) + ("" if attack.get("in_merge", True) else " (not merged)")


def rows_table(rows: list[dict], tasks: list[str]) -> str:
    """Markdown table: one line per row, accuracy in percent."""
    head = "| merge | λ | attack | defense | " + " | ".join(tasks) + " | mean | norm | ASR | RA | clean→target |"
    lines = [head, "|" + "---|" * (9 + len(tasks))]
    for r in rows:
        accs = [f"{100 * r['clean_acc'][t]:.1f}" if t in r["clean_acc"] else "" for t in tasks]
        coef = "" if r["coefficient"] is None else f"{r['coefficient']:g}"
        norm = "" if r["normalized_acc"] is None else f"{100 * r['normalized_acc']:.1f}"
        attack = attack_label(r["attack"])
        bd = ["" if r.get(k) is None else f"{100 * r[k]:.1f}" for k in ("asr", "ra", "clean_to_target")]
        defense = r["defense"] if r.get("defense_alpha") is None else f"{r['defense']} α={r['defense_alpha']:g}" + (
            " (selected)" if r.get("defense_selected") else "")
        lines.append(f"| {r['merge']} | {coef} | {attack} | {defense} | " + " | ".join(accs)
                     + f" | {100 * r['mean_clean_acc']:.1f} | {norm} | " + " | ".join(bd) + " |")
    return "\n".join(lines)


def write_results(out_dir: Path, config: dict, rows: list[dict], tasks: list[str]) -> Path:
    """results.json (config, code_version, rows) and results.csv, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"config": config, "code_version": code_version(), "rows": rows}
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["merge", "coefficient", "attack", "in_merge", "defense", "mean_clean_acc", "normalized_acc",
                "asr", "ra", "clean_to_target", "asr_hits", "asr_total"] + [f"acc_{t}" for t in tasks]
               + ["scenario", "defense_alpha", "defense_selected"])
    for r in rows:
        in_merge = None if isinstance(r["attack"], str) else r["attack"].get("in_merge")
        w.writerow([r["merge"], r["coefficient"], attack_label(r["attack"]).replace(" (not merged)", ""),
                    in_merge, r["defense"], r["mean_clean_acc"], r["normalized_acc"], r["asr"], r.get("ra"),
                    r.get("clean_to_target"), r.get("asr_hits"), r.get("asr_total")] + [r["clean_acc"].get(t) for t in tasks]
                   + [r.get("scenario"), r.get("defense_alpha"), r.get("defense_selected")])
    for name, text in (("results.json", json.dumps(payload, indent=2, default=str)), ("results.csv", buf.getvalue())):
        tmp = out_dir / f".{name}.tmp{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, out_dir / name)
    return out_dir / "results.json"


def make_row(merge: str, coefficient, clean_acc: dict, individual: dict | None) -> dict:
    mean = sum(clean_acc.values()) / len(clean_acc)
    norm = None
    if individual and all(t in individual for t in clean_acc):
        norm = sum(clean_acc[t] / individual[t] for t in clean_acc) / len(clean_acc)
    return {"merge": merge, "coefficient": coefficient, "attack": "none", "defense": "none", "clean_acc": clean_acc,
            "mean_clean_acc": mean, "normalized_acc": norm, "asr": None, "ra": None, "clean_to_target": None}


def attack_rows(row: dict, results: dict[str, dict], probes: list, in_merge: set[str]) -> list[dict]:
    """One row per measured trigger: ``row``'s clean accuracy plus the trigger's spec and rates."""
    out = []
    for p in probes:
        if p.name in results:
            attack = {**p.describe(), "in_merge": p.name in in_merge}
            out.append({**row, "attack": attack, **results[p.name]})
    return out


DATA_METHODS = ("regmean", "adamerging")  # merges that need data, not only weights


class Merger:
    """θ_pre, the models and their tasks, and one way to produce merged state dicts for any method."""

    def __init__(self, cfg, base):
        from datamodules.tasks import get_task

        self.cfg, self.base = cfg, base
        validate_config(cfg)
        self.theta_pre = base.encoder_state_dict()
        self.metas = [model_metadata(p) for p in cfg.models]
        given = cfg.tasks or [None] * len(cfg.models)
        self.tasks = [_task_of(p, m, given[i]) for i, (p, m) in enumerate(zip(cfg.models, self.metas))]
        for p, t in zip(cfg.models, self.tasks):
            try:
                get_task(t)
            except ValueError as e:
                raise MergeInputError(f"{p}: {e}; pass --tasks to name its task") from None
        for p, m in zip(cfg.models, self.metas):
            check_base(p, m, base.base_id)
        total = sum(os.path.getsize(p) for p in cfg.models)
        self.streaming = cfg.engine == "streaming" or (cfg.engine == "auto" and total > (1 << 30))
        # Keys, shapes and dtypes against θ_pre, finite values, no model twice: before any merge or evaluation.
        if self.streaming:
            self.pre_path = self._pretrained_file()
            validate_inputs(self.pre_path, cfg.models)
            self.vectors = None
        else:
            validate_inputs(self.theta_pre, cfg.models, pretrained_name=f"θ_pre ({base.base_id})")
            self.vectors = [task_vector(load_state_dict(p), self.theta_pre) for p in tqdm(cfg.models, desc="task vectors", leave=False)]

    def _pretrained_file(self) -> Path:
        """θ_pre as a safetensors file (cached), so the streaming engine can read it tensor by tensor."""
        key = self.base.base_id.replace("/", "_").replace("@", "-").replace(":", "-")
        path = Path(self.cfg.cache_dir) / "pretrained" / f"{key}.safetensors"
        if not path.exists():
            save_state_dict(path, self.theta_pre, {"kind": "pretrained", "base_model": self.base.describe()})
        return path

    def merge(self, method: str, hparams: dict) -> dict:
        if method == "regmean":
            return self._regmean(hparams)
        if method == "adamerging":
            return self._adamerging(hparams)
        if self.streaming:
            return merge_files(self.pre_path, self.cfg.models, method, progress=False, num_threads=self.cfg.merge_threads, **hparams)
        return get_merge_method(method)(self.theta_pre, self.vectors, **hparams)

    def _regmean(self, hparams: dict) -> dict:
        """RegMean: Gram matrices of every linear layer's inputs, from each model on its own task's train batches."""
        from datamodules.datamodule import TaskDataModule
        from merging.regmean import linear_input_grams, regmean_merge

        hp = dict(hparams)
        n_batches = int(hp.pop("gram_batches", 4))
        encoder = self.base.model.visual
        finetuned, grams = [], []
        for path, task in zip(self.cfg.models, self.tasks):
            dm = TaskDataModule(task=task, data_dir=self.cfg.data_dirs.get(task), model_name=self.base.name,
                                cache_dir=self.cfg.cache_dir, batch_size=self.cfg.gram_batch_size,
                                synthetic_train_size=self.cfg.synthetic_train_size, synthetic_test_size=self.cfg.synthetic_test_size)
            dm.prepare_data()
            dm.setup("fit")
            sd = load_state_dict(path)
            encoder.load_state_dict(sd)
            batches = [x for i, (x, _) in zip(range(n_batches), dm.train_dataloader())]
            grams.append(linear_input_grams(encoder, batches))
            finetuned.append(sd)
        encoder.load_state_dict(self.theta_pre)
        return regmean_merge(self.theta_pre, finetuned, grams, **hp)

    def _adamerging(self, hparams: dict) -> dict:
        """AdaMerging: learn λ by entropy minimisation on unlabeled val batches of every task."""
        import lightning as L

        from lightning_modules.adamerging import AdaMerging, MultiTaskUnlabeledDataModule

        hp = dict(hparams)
        steps = int(hp.pop("steps", 500))
        module = AdaMerging(model_name=self.cfg.model_name, pretrained=self.cfg.pretrained, models=list(self.cfg.models),
                            tasks=self.tasks, cache_dir=self.cfg.cache_dir, **hp)
        dm = MultiTaskUnlabeledDataModule(tasks=list(dict.fromkeys(self.tasks)), model_name=self.cfg.model_name,
                                          cache_dir=self.cfg.cache_dir, batch_size=16, split="val", data_dirs=self.cfg.data_dirs,
                                          synthetic_train_size=self.cfg.synthetic_train_size,
                                          synthetic_test_size=self.cfg.synthetic_test_size)
        trainer = L.Trainer(max_steps=steps, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=not os.environ.get("CI"), enable_model_summary=False)
        trainer.fit(module, datamodule=dm)
        self.last_adamerging_coefficients = module.coefficients()
        return {k: v.cpu() for k, v in module.merged_state_dict().items()}


def attack_probes(cfg, merger: "Merger", base) -> tuple[list, list]:
    """(triggers of backdoored inputs in the merge, triggers of ``--probe_models`` kept out of it)."""
    from evaluation.evaluate import AttackProbe

    def probe(path: str, meta: dict | None, label: str):
        try:
            return AttackProbe.from_metadata(label, meta["attack"], base.image_size)
        except (KeyError, ValueError) as e:
            raise MergeInputError(f"{path}: its attack metadata is unusable ({e}); re-export it with BackdoorInjection") from None

    labels = _unique_labels(list(cfg.models) + list(cfg.probe_models))
    merger.probe_names = [labels[i] if m and m.get("attack") else None for i, m in enumerate(merger.metas)]
    inside = [probe(p, m, n) for p, m, n in zip(cfg.models, merger.metas, merger.probe_names) if n]
    outside = []
    for i, path in enumerate(cfg.probe_models, start=len(cfg.models)):
        if not Path(path).is_file():
            raise MergeInputError(f"--probe_models: {path} does not exist; pass a backdoored export (safetensors)")
        meta = load_metadata(path)
        if not meta or not meta.get("attack"):
            raise MergeInputError(f"--probe_models: {path} has no attack metadata; pass a BackdoorInjection export")
        check_base(path, meta, base.base_id)
        outside.append(probe(path, meta, labels[i]))
    return inside, outside + trigger_probes(cfg, base)


def _unique_labels(paths: list[str]) -> list[str]:
    """File stems, with the parent folder prepended where stems collide."""
    stems = [Path(p).stem for p in paths]
    return [f"{Path(p).parent.name}/{s}" if stems.count(s) > 1 else s for p, s in zip(paths, stems)]


def plan_entries(cfg) -> list[dict]:
    """The (method, coefficients, hparams, select_on) entries to run: ``--plan`` or the single-method flags."""
    if cfg.plan:
        return [{"coefficients": [None], "hparams": {}, "select_on": None, "measure_attacks": True, **e} for e in cfg.plan]
    return [{"method": cfg.method, "coefficients": cfg.coefficients, "hparams": cfg.hparams, "select_on": cfg.select_on}]


def run(cfg) -> Path | None:
    """Merge, evaluate, write results; returns the path of results.json (None without evaluation)."""
    from evaluation.evaluate import evaluate as evaluate_tasks
    from evaluation.evaluate import load_eval_tasks

    if not cfg.models:
        raise MergeInputError("no models given; pass --models a.safetensors b.safetensors ...")
    if cfg.tasks is not None and len(cfg.tasks) != len(cfg.models):
        raise MergeInputError(f"--tasks has {len(cfg.tasks)} entries for {len(cfg.models)} --models; give one task per model")
    entries = plan_entries(cfg)
    for e in entries:
        if e["method"] not in DATA_METHODS:
            get_merge_method(e["method"])  # unknown names fail before any work
        if e.get("select_on") not in (None, "val"):
            raise MergeInputError(f"select_on must be 'val' or null, got {e['select_on']!r}")
    if cfg.export and (len(entries) != 1 or len(entries[0]["coefficients"]) != 1):
        raise MergeInputError(f"--export needs exactly one method and one coefficient, got {entries}; pass --coefficients λ")
    out_dir = Path(cfg.out_dir)
    if cfg.evaluate:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(out_dir, os.W_OK):
            raise MergeInputError(f"output directory {out_dir} is not writable; pass another --out_dir")

    base = load_base_model(cfg.model_name, cfg.pretrained, device="cpu")
    merger = Merger(cfg, base)
    tasks = merger.tasks
    probes_in, probes_out = attack_probes(cfg, merger, base)
    probes = probes_in + probes_out
    in_merge = {p.name for p in probes_in}
    eval_names = cfg.eval_tasks or list(dict.fromkeys(tasks))
    eval_names += [t for t in dict.fromkeys(p.target_task for p in probes) if t not in eval_names]
    encoder = base.model.visual.to(cfg.device)
    data = {}

    def evaluate(state: dict, split: str = "test", with_probes=(), names=None) -> tuple[dict, dict]:
        if split not in data:
            data[split] = load_eval_tasks(eval_names, base, split=split, cache_dir=cfg.cache_dir, data_dirs=cfg.data_dirs,
                                          batch_size=cfg.batch_size, synthetic_train_size=cfg.synthetic_train_size,
                                          synthetic_test_size=cfg.synthetic_test_size,
                                          max_examples=None if split == "test" else cfg.val_max_examples)
        encoder.load_state_dict(state)
        tasks_here = {n: t for n, t in data[split].items() if names is None or n in names}
        return evaluate_tasks(encoder, tasks_here, list(with_probes), cfg.device)

    individual: dict[str, dict] = {}

    def individual_on(split: str) -> dict:
        if split not in individual:
            individual[split] = {}
            for p, t in zip(cfg.models, tasks):
                if t in eval_names:
                    individual[split][t] = evaluate(load_state_dict(p), split, names={t})[0][t]
        return individual[split]

    def rows_for(row: dict, attacks: dict, measured: list) -> list[dict]:
        return [row] + attack_rows(row, attacks, measured, in_merge)

    bv_inj = ibvs_vector(cfg, base) if cfg.defense == "ibvs" else None
    ibvs_selection: list[dict] = []

    def select_alpha(merged: dict, defended: dict) -> float:
        """The largest α whose mean val clean accuracy is within ibvs_max_drop of the undefended merge's
        (clean val data only: nothing of the attacker); the smallest α when none is."""
        def mean_val(state):
            accs = evaluate(state, "val")[0]
            return sum(accs.values()) / len(accs)

        reference = mean_val(merged)
        scores = {a: mean_val(s) for a, s in defended.items()}
        ok = [a for a, v in scores.items() if v >= reference - cfg.ibvs_max_drop]
        chosen = max(ok) if ok else min(scores)
        ibvs_selection.append({"split": "val", "rule": f"largest α with mean val accuracy ≥ undefended − {cfg.ibvs_max_drop}",
                               "undefended": reference, "scores": scores, "chosen": chosen})
        return chosen

    rows: list[dict] = []
    if cfg.evaluate and cfg.individual:
        rows.append({**make_row("individual", None, individual_on("test"), None), "normalized_acc": 1.0})
        for p in probes_in:  # each backdoored model alone: its own task, its trigger on its target task
            path, own = next((m, t) for m, t, pr in zip(cfg.models, tasks, merger.probe_names) if pr == p.name)
            accs, attacks = evaluate(load_state_dict(path), "test", [p], names={own, p.target_task})
            row = {**make_row("individual", None, {own: accs[own]}, None), "normalized_acc": None}
            rows += attack_rows(row, attacks, [p], in_merge)
    if cfg.evaluate and cfg.zero_shot:
        accs, attacks = evaluate(merger.theta_pre, "test", probes)
        rows += rows_for(make_row("zero-shot", None, accs, individual.get("test")), attacks, probes)

    for e in entries:
        method, name = e["method"], e.get("name", e["method"])
        defaults = {} if method in DATA_METHODS else method_hyperparameters(method)
        hparams = {**defaults, **e["hparams"]}
        coefs = e["coefficients"] if "coefficient" in defaults else [None]

        def hp_at(c):
            return {**hparams, "coefficient": c} if c is not None else hparams

        selection = None
        if e.get("select_on") == "val" and cfg.evaluate and len(coefs) > 1:
            ind_val = individual_on("val")
            scores = {}
            for c in tqdm(coefs, desc=f"{name}: select λ on val", leave=False):
                accs = evaluate(merger.merge(method, hp_at(c)), "val")[0]
                # over the merged models' tasks (a probe's target task outside the merge has no individual)
                scored = [t for t in accs if t in ind_val]
                scores[c] = sum(accs[t] / ind_val[t] for t in scored) / len(scored)
            chosen = max(scores, key=scores.get)
            selection = {"split": "val", "metric": "mean normalized accuracy", "scores": scores, "chosen": chosen,
                         "val_examples_per_task": cfg.val_max_examples}
            coefs = [chosen]
        for c in tqdm(coefs, desc=name, leave=False):
            merged = merger.merge(method, hp_at(c))
            defended, chosen = {}, None
            if bv_inj is not None and e.get("defend", True):
                defended = {a: ibvs_defend(merged, bv_inj, a) for a in cfg.ibvs_alphas}
                if cfg.ibvs_select == "val" and cfg.evaluate:
                    chosen = select_alpha(merged, defended)
            if cfg.export:
                meta = {"kind": "merge", "method": method, "hyperparameters": hp_at(c), "models": [str(p) for p in cfg.models],
                        "tasks": tasks, "base_model": base.describe(), "code_version": code_version()}
                export_alpha = chosen if chosen is not None else (cfg.ibvs_alphas[0] if defended else None)
                if export_alpha is not None:
                    meta["defense"] = {"name": "ibvs", "alpha": export_alpha, "clean": cfg.ibvs_clean, "backdoored": cfg.ibvs_backdoored}
                save_state_dict(cfg.export, defended[export_alpha] if export_alpha is not None else merged, meta)
            if cfg.evaluate:
                measured = probes if e.get("measure_attacks", True) else []
                accs, attacks = evaluate(merged, "test", measured)
                row = make_row(name, c, accs, individual.get("test"))
                row["method"] = method
                row["hyperparameters"] = hp_at(c)
                if method == "adamerging":
                    row["hyperparameters"]["learned_coefficients"] = merger.last_adamerging_coefficients
                if selection:
                    row["selection"] = selection
                rows += rows_for(row, attacks, measured)
                for a, state in defended.items():
                    accs, attacks = evaluate(state, "test", measured)
                    drow = {**make_row(name, c, accs, individual.get("test")), "method": method, "hyperparameters": hp_at(c),
                            "defense": "ibvs", "defense_alpha": a, "defense_selected": a == chosen}
                    if chosen is not None:
                        drow["defense_selection"] = ibvs_selection[-1]
                    rows += rows_for(drow, attacks, measured)

    if not cfg.evaluate:
        return None
    config = {k: v for k, v in cfg.as_dict().items() if k != "config"}
    path = write_results(out_dir, config, rows, eval_names)
    print(rows_table(rows, eval_names))
    return path


USER_ERRORS = (ValueError, OSError, FloatingPointError, argparse.ArgumentError)  # MergeInputError is a ValueError


def check_config_files(argv: list[str]) -> None:
    """``--config`` files exist and are well-formed YAML mappings (jsonargparse's own message spans many lines)."""
    import yaml

    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    values += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for value in values:
        path = Path(value)
        if not path.is_file():
            if "\n" not in value and ":" not in value:
                raise MergeInputError(f"--config {value}: file not found; check the path (configs/merge/ holds the shipped ones)")
            continue  # inline YAML: jsonargparse parses it
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise MergeInputError(f"--config {value}: malformed YAML{where} ({getattr(e, 'problem', None) or type(e).__name__}); "
                                  "fix the file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise MergeInputError(f"--config {value}: unreadable ({_one_line(e)}); check the file") from None
        if data is not None and not isinstance(data, dict):
            raise MergeInputError(f"--config {value}: holds a {type(data).__name__}, not a mapping of settings; "
                                  "see configs/merge/ for the format")


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _parse_error_line(error: BaseException) -> str:
    """jsonargparse's parse error as one line; an unknown option or config key says so and names it."""
    import re

    text = _one_line(error)
    key = (re.search(r"Option '([^']+)' is not accepted", text) or re.search(r'Key "([^"]+)" is not expected', text)
           or re.search(r'No action for key "([^"]+)"', text) or re.search(r"Unrecognized arguments: (\S+)", text, re.I))
    if key:
        return f"unknown option or config key {key.group(1).lstrip('-')!r}; fix its spelling or remove it (merge.py --help lists them)"
    return f"{text}; see merge.py --help"


def _output_snapshot(cfg) -> dict:
    """What exists before the run, so that a failed run can remove exactly what it created."""
    out_dir = Path(cfg.out_dir)
    created_root = None
    probe = out_dir
    while not probe.exists() and probe.parent != probe:
        created_root, probe = probe, probe.parent
    export = Path(cfg.export) if cfg.export else None
    return {"out_dir": out_dir, "created_root": created_root, "export": export,
            "export_existed": bool(export and export.exists()),
            "sidecar_existed": bool(export and metadata_path(export).exists())}


def _remove_partial_outputs(snapshot: dict) -> None:
    """After a failure: drop the export this run wrote, its temp files, and directories it created (if empty)."""
    export = snapshot["export"]
    if export is not None:
        if not snapshot["export_existed"] and export.is_file():
            export.unlink()
        if not snapshot["sidecar_existed"] and metadata_path(export).is_file():
            metadata_path(export).unlink()
    out_dir = snapshot["out_dir"]
    if out_dir.is_dir():
        for tmp in out_dir.glob(f".results.*.tmp{os.getpid()}"):
            tmp.unlink(missing_ok=True)
    root = snapshot["created_root"]
    if root is not None:
        current = out_dir
        while True:
            try:
                current.rmdir()  # only if empty
            except OSError:
                break
            if current == root:
                break
            current = current.parent


def main(argv=None) -> int:
    """CLI entry: exit status 0, or 2 with one line ``merge.py: error: ...`` on stderr for bad input.

    ``BADMERGING_TRACEBACK=1`` re-raises instead (full traceback). A failed run leaves no partial outputs.
    """
    parser = build_parser()
    parser.exit_on_error = False  # parse errors become one line below, not usage + message
    try:
        check_config_files(list(sys.argv[1:] if argv is None else argv))
        cfg = parser.parse_args(argv)
        validate_config(cfg)
        snapshot = _output_snapshot(cfg)
        try:
            path = run(cfg)
        except BaseException:
            _remove_partial_outputs(snapshot)
            raise
    except USER_ERRORS as e:
        if os.environ.get("BADMERGING_TRACEBACK"):
            raise
        print(f"merge.py: error: {_parse_error_line(e) if isinstance(e, argparse.ArgumentError) else _one_line(e)}",
              file=sys.stderr)
        return 2
    if path is not None:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
