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
all-clean merge, the "inherent" baseline). Each evaluated model gives one row with ``attack: "none"``
(clean accuracy) and one row per trigger measured, whose ``attack`` is the spec plus ``in_merge``.
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
    p.add_argument("--tasks", type=str, nargs="+", default=None, help="task of each model (default: from metadata)")
    p.add_argument("--eval_tasks", type=str, nargs="+", default=None, help="tasks to evaluate (default: the models' tasks)")
    p.add_argument("--method", type=str, default="task_arithmetic", help="task_arithmetic, weight_average, ties, dare, breadcrumbs, consensus, regmean, adamerging")
    p.add_argument("--coefficients", type=float, nargs="+", default=[0.3], help="merge coefficients λ to evaluate")
    p.add_argument("--hparams", type=dict, default={}, help="other hyperparameters of the method, e.g. {k: 20}")
    p.add_argument("--select_on", type=str | None, default=None, help="'val': pick the coefficient with the best mean normalised accuracy on the val split")
    p.add_argument("--plan", type=list[dict] | None, default=None,
                   help="several methods in one table: a list of {name, method, coefficients, hparams, select_on, measure_attacks} (see configs/merge/)")
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
    """Refuse a model fine-tuned from another base; warn when nothing says which base it came from."""
    if not meta:
        warnings.warn(f"{path}: no JSON metadata beside it; cannot verify its task or base model", stacklevel=2)
        return
    theirs = (meta.get("base_model") or {}).get("base_id")
    if theirs and theirs != base_id:
        raise MergeInputError(f"{path} was fine-tuned from {theirs}, not from the base {base_id}; pass the matching --model_name/--pretrained")


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
        lines.append(f"| {r['merge']} | {coef} | {attack} | {r['defense']} | " + " | ".join(accs)
                     + f" | {100 * r['mean_clean_acc']:.1f} | {norm} | " + " | ".join(bd) + " |")
    return "\n".join(lines)


def write_results(out_dir: Path, config: dict, rows: list[dict], tasks: list[str]) -> Path:
    """results.json (config, code_version, rows) and results.csv, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"config": config, "code_version": code_version(), "rows": rows}
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["merge", "coefficient", "attack", "in_merge", "defense", "mean_clean_acc", "normalized_acc",
                "asr", "ra", "clean_to_target", "asr_hits", "asr_total"] + [f"acc_{t}" for t in tasks] + ["scenario"])
    for r in rows:
        in_merge = None if isinstance(r["attack"], str) else r["attack"].get("in_merge")
        w.writerow([r["merge"], r["coefficient"], attack_label(r["attack"]).replace(" (not merged)", ""),
                    in_merge, r["defense"], r["mean_clean_acc"], r["normalized_acc"], r["asr"], r.get("ra"),
                    r.get("clean_to_target"), r.get("asr_hits"), r.get("asr_total")] + [r["clean_acc"].get(t) for t in tasks]
                   + [r.get("scenario")])
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
        self.cfg, self.base = cfg, base
        self.theta_pre = base.encoder_state_dict()
        self.metas = [load_metadata(p) for p in cfg.models]
        given = cfg.tasks or [None] * len(cfg.models)
        self.tasks = [_task_of(p, m, given[i]) for i, (p, m) in enumerate(zip(cfg.models, self.metas))]
        for p, m in zip(cfg.models, self.metas):
            check_base(p, m, base.base_id)
        total = sum(os.path.getsize(p) for p in cfg.models)
        self.streaming = cfg.engine == "streaming" or (cfg.engine == "auto" and total > (1 << 30))
        if self.streaming:
            self.pre_path = self._pretrained_file()
            validate_inputs(self.pre_path, cfg.models)
            self.vectors = None
        else:
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
    return inside, outside


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
                scores[c] = sum(accs[t] / ind_val[t] for t in accs) / len(accs)
            chosen = max(scores, key=scores.get)
            selection = {"split": "val", "metric": "mean normalized accuracy", "scores": scores, "chosen": chosen,
                         "val_examples_per_task": cfg.val_max_examples}
            coefs = [chosen]
        for c in tqdm(coefs, desc=name, leave=False):
            merged = merger.merge(method, hp_at(c))
            if cfg.export:
                meta = {"kind": "merge", "method": method, "hyperparameters": hp_at(c), "models": [str(p) for p in cfg.models],
                        "tasks": tasks, "base_model": base.describe(), "code_version": code_version()}
                save_state_dict(cfg.export, merged, meta)
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

    if not cfg.evaluate:
        return None
    config = {k: v for k, v in cfg.as_dict().items() if k != "config"}
    path = write_results(out_dir, config, rows, eval_names)
    print(rows_table(rows, eval_names))
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
