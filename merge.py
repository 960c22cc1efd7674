"""Merge exported image encoders and evaluate the merge: clean accuracy per task, mean, normalised.

    python merge.py --models m1.safetensors m2.safetensors --coefficients 0.1 0.2 0.3 --out_dir outputs/merge
    python merge.py --config configs/merge/embedded_ta.yaml
    python merge.py --models ... --coefficients 0.3 --export merged.safetensors --evaluate false

Inputs are safetensors state dicts of the image encoder (as ``train.py`` exports them); the JSON
metadata beside each file names its task and base model and is checked against the base (a warning
when absent). Results: ``<out_dir>/results.json`` (config, code version, rows), ``results.csv``, and a
markdown table on stdout. Row contract: ``merge``, ``coefficient``, ``attack``, ``defense``,
``clean_acc`` (task -> fraction), ``mean_clean_acc``, ``normalized_acc``, ``asr``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import warnings
from pathlib import Path

import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from tqdm.auto import tqdm

from merging.io import MergeInputError, load_metadata, load_state_dict, save_state_dict
from merging.methods import get_merge_method, method_hyperparameters
from merging.task_vectors import task_vector
from modeling.clip import EMBEDDED_MODEL, load_base_model
from modeling.version import code_version


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Merge exported image encoders and evaluate the merge.", prog="merge.py")
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--model_name", type=str, default=EMBEDDED_MODEL, help="open_clip model name of θ_pre")
    p.add_argument("--pretrained", type=str | None, default=None, help="pretrained tag or local weights of θ_pre")
    p.add_argument("--models", type=str, nargs="+", default=[], help="exported encoders (safetensors) to merge")
    p.add_argument("--tasks", type=str, nargs="+", default=None, help="task of each model (default: from metadata)")
    p.add_argument("--eval_tasks", type=str, nargs="+", default=None, help="tasks to evaluate (default: the models' tasks)")
    p.add_argument("--method", type=str, default="task_arithmetic")
    p.add_argument("--coefficients", type=float, nargs="+", default=[0.3], help="merge coefficients λ to evaluate")
    p.add_argument("--hparams", type=dict, default={}, help="other hyperparameters of the method, e.g. {k: 20}")
    p.add_argument("--evaluate", type=bool, default=True)
    p.add_argument("--zero_shot", type=bool, default=True, help="also evaluate θ_pre (row merge=zero-shot)")
    p.add_argument("--individual", type=bool, default=True, help="also evaluate each model on its own task")
    p.add_argument("--export", type=str | None, default=None, help="write the merged weights here (needs one coefficient)")
    p.add_argument("--out_dir", type=str, default="outputs/merge")
    p.add_argument("--cache_dir", type=str, default=".cache/badmerging")
    p.add_argument("--data_dirs", type=dict[str, str], default={}, help="task -> local data directory")
    p.add_argument("--batch_size", type=int, default=512)
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--synthetic_test_size", type=int, default=1000)
    return p


def _task_of(path: str, meta: dict | None, given: str | None) -> str:
    if given:
        return given
    if meta and meta.get("task"):
        return meta["task"]
    raise MergeInputError(f"{path}: no metadata names its task; pass --tasks in the same order as --models")


def check_base(path: str, meta: dict | None, base_id: str) -> None:
    """Refuse a model fine-tuned from another base; warn when nothing says which base it came from."""
    if not meta:
        warnings.warn(f"{path}: no JSON metadata beside it; cannot verify its task or base model", stacklevel=2)
        return
    theirs = (meta.get("base_model") or {}).get("base_id")
    if theirs and theirs != base_id:
        raise MergeInputError(f"{path} was fine-tuned from {theirs}, not from the base {base_id}; pass the matching --model_name/--pretrained")


def rows_table(rows: list[dict], tasks: list[str]) -> str:
    """Markdown table: one line per row, accuracy in percent."""
    head = "| merge | λ | attack | defense | " + " | ".join(tasks) + " | mean | norm |"
    lines = [head, "|" + "---|" * (6 + len(tasks))]
    for r in rows:
        accs = [f"{100 * r['clean_acc'][t]:.1f}" if t in r["clean_acc"] else "" for t in tasks]
        coef = "" if r["coefficient"] is None else f"{r['coefficient']:g}"
        norm = "" if r["normalized_acc"] is None else f"{100 * r['normalized_acc']:.1f}"
        attack = r["attack"] if isinstance(r["attack"], str) else r["attack"].get("name", "?")
        lines.append(f"| {r['merge']} | {coef} | {attack} | {r['defense']} | " + " | ".join(accs) + f" | {100 * r['mean_clean_acc']:.1f} | {norm} |")
    return "\n".join(lines)


def write_results(out_dir: Path, config: dict, rows: list[dict], tasks: list[str]) -> Path:
    """results.json (config, code_version, rows) and results.csv, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"config": config, "code_version": code_version(), "rows": rows}
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["merge", "coefficient", "attack", "defense", "mean_clean_acc", "normalized_acc", "asr"] + [f"acc_{t}" for t in tasks])
    for r in rows:
        attack = r["attack"] if isinstance(r["attack"], str) else json.dumps(r["attack"], sort_keys=True)
        w.writerow([r["merge"], r["coefficient"], attack, r["defense"], r["mean_clean_acc"], r["normalized_acc"], r["asr"]]
                   + [r["clean_acc"].get(t) for t in tasks])
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
            "mean_clean_acc": mean, "normalized_acc": norm, "asr": None}


def run(cfg) -> Path | None:
    """Merge, evaluate, write results; returns the path of results.json (None without evaluation)."""
    from evaluation.evaluate import evaluate_encoder, load_eval_tasks

    if not cfg.models:
        raise MergeInputError("no models given; pass --models a.safetensors b.safetensors ...")
    if cfg.tasks is not None and len(cfg.tasks) != len(cfg.models):
        raise MergeInputError(f"--tasks has {len(cfg.tasks)} entries for {len(cfg.models)} --models; give one task per model")
    if cfg.export and len(cfg.coefficients) != 1:
        raise MergeInputError(f"--export needs exactly one coefficient, got {cfg.coefficients}; pass --coefficients λ")
    method = get_merge_method(cfg.method)
    hparams = {**method_hyperparameters(cfg.method), **cfg.hparams}
    out_dir = Path(cfg.out_dir)

    base = load_base_model(cfg.model_name, cfg.pretrained, device="cpu")
    theta_pre = base.encoder_state_dict()
    metas = [load_metadata(p) for p in cfg.models]
    tasks = [_task_of(p, m, (cfg.tasks or [None] * len(cfg.models))[i]) for i, (p, m) in enumerate(zip(cfg.models, metas))]
    for p, m in zip(cfg.models, metas):
        check_base(p, m, base.base_id)
    vectors = [task_vector(load_state_dict(p), theta_pre) for p in tqdm(cfg.models, desc="task vectors", leave=False)]

    rows: list[dict] = []
    eval_tasks_names = cfg.eval_tasks or list(dict.fromkeys(tasks))
    evaluator = None
    if cfg.evaluate:
        eval_data = load_eval_tasks(eval_tasks_names, base, cache_dir=cfg.cache_dir, data_dirs=cfg.data_dirs,
                                    batch_size=cfg.batch_size, synthetic_test_size=cfg.synthetic_test_size)
        encoder = base.model.visual.to(cfg.device)

        def evaluator(state: dict) -> dict:
            encoder.load_state_dict(state)
            return evaluate_encoder(encoder, eval_data, cfg.device)

    individual = None
    if cfg.evaluate and cfg.individual:
        individual = {}
        for p, t in zip(cfg.models, tasks):
            if t in eval_tasks_names:
                base.model.visual.load_state_dict(load_state_dict(p))
                individual[t] = evaluate_encoder(base.model.visual, {t: eval_data[t]}, cfg.device)[t]
        rows.append({**make_row("individual", None, individual, None), "normalized_acc": 1.0})
    if cfg.evaluate and cfg.zero_shot:
        rows.append(make_row("zero-shot", None, evaluator(theta_pre), individual))

    for coefficient in tqdm(cfg.coefficients, desc=f"{cfg.method} λ", leave=False):
        merged = method(theta_pre, vectors, **{**hparams, "coefficient": coefficient}) if "coefficient" in hparams \
            else method(theta_pre, vectors, **hparams)
        if cfg.export:
            meta = {"kind": "merge", "method": cfg.method, "hyperparameters": {**hparams, "coefficient": coefficient},
                    "models": [str(p) for p in cfg.models], "tasks": tasks, "base_model": base.describe(), "code_version": code_version()}
            save_state_dict(cfg.export, merged, meta)
        if evaluator is not None:
            row = make_row(cfg.method, coefficient if "coefficient" in hparams else None, evaluator(merged), individual)
            row["hyperparameters"] = {**hparams, "coefficient": coefficient}
            rows.append(row)

    if not cfg.evaluate:
        return None
    config = {k: v for k, v in cfg.as_dict().items() if k != "config"}
    path = write_results(out_dir, config, rows, eval_tasks_names)
    print(rows_table(rows, eval_tasks_names))
    return path


def main(argv=None) -> int:
    parser = build_parser()
    cfg = parser.parse_args(argv)
    try:
        path = run(cfg)
    except (MergeInputError, ValueError, FileNotFoundError) as e:
        if os.environ.get("BADMERGING_TRACEBACK"):
            raise
        print(f"merge.py: error: {e}", file=sys.stderr)
        return 2
    if path is not None:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
