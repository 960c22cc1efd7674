"""Merge exported image encoders and evaluate the merge: clean accuracy per task, mean, normalised, and ASR.

    python merge.py --models m1.safetensors m2.safetensors --coefficients 0.1 0.2 0.3 --out_dir outputs/merge
    python merge.py --config configs/merge/embedded_ta.yaml
    python merge.py --models ... --coefficients 0.3 --export merged.safetensors --evaluate false

A thin entry point over ``evaluation.merge_eval`` (the in-process API: ``MergeEvalRequest`` -> rows): it parses
the flags, builds the request, and writes ``<out_dir>/results.json`` (config, code version, rows),
``results.csv`` and a markdown table on stdout. Inputs are safetensors state dicts of the image encoder (as
``train.py`` exports them); the JSON metadata beside each file names its task and base model. Row contract:
``merge``, ``coefficient``, ``attack`` (null, or the measured trigger's spec with ``in_merge``), ``defense``,
``clean_acc`` (task -> fraction), ``mean_clean_acc``, ``normalized_acc``, ``asr``, ``ra``, ``clean_to_target``
(+ ``*_hits`` / ``*_total``).

Methods (``--method`` / ``--plan``) are registered names (``evaluation.merge_methods``) or import paths of a
``MergeMethod`` class (``my_module.MyMethod``). Backdoors: every input with ``attack`` metadata is measured with its
own trigger; ``--probe_models`` adds triggers of models that are not merged, ``--probe_triggers`` stage-1 trigger
files (attack name ``inherent``). Defense: ``--defense ibvs --ibvs_clean c --ibvs_backdoored b --ibvs_alphas 0.5 1 2``
also evaluates θ_merged − α·BV_inj for every merge and α, marking the largest α whose mean val accuracy stays within
``--ibvs_max_drop`` of the undefended merge; ``--defenses`` takes any registered defense (``defenses/``) or class path
as a list of {name, inputs, strengths, select, max_drop}.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from jsonargparse import ActionConfigFile, ArgumentParser

from experiments.cli import (DEVICE_HELP, add_tasks_file_argument, check_config_files, load_tasks_files, resolve_device,
                             run_cli, take_tasks_files)

if TYPE_CHECKING:
    from evaluation.merge_eval import MergeEvalRequest

# torch, open_clip and the evaluation stack are imported once the flags are parsed (``merge.py --help`` stays fast)

#: where the IBVS flags put their values in the defense setting (its messages name the flags)
IBVS_FLAGS = {"defense": "--defense", "inputs.clean": "--ibvs_clean", "inputs.backdoored": "--ibvs_backdoored",
              "strengths": "--ibvs_alphas", "select": "--ibvs_select", "max_drop": "--ibvs_max_drop"}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Merge exported image encoders and evaluate the merge.", prog="merge.py")
    p.add_argument("--config", action=ActionConfigFile)
    add_tasks_file_argument(p)
    p.add_argument("--model_name", type=str | None, default=None,
                   help="open_clip model name of θ_pre (default: the embedded base model, modeling.clip.EMBEDDED_MODEL)")
    p.add_argument("--pretrained", type=str | None, default=None, help="pretrained tag or local weights of θ_pre")
    p.add_argument("--models", type=str, nargs="+", default=[], help="exported encoders (safetensors) to merge")
    p.add_argument("--probe_models", type=str, nargs="+", default=[],
                   help="backdoored exports whose triggers are measured on every row but which are not merged")
    p.add_argument("--probe_triggers", type=str, nargs="+", default=[],
                   help="stage-1 trigger files (optimised on θ_pre alone: inherent triggers) measured on every row")
    p.add_argument("--defense", type=str, default="none",
                   help="none | ibvs (subtract α·BV_inj of the defender's own pair) | a Defense class path")
    p.add_argument("--ibvs_clean", type=str | None, default=None, help="IBVS: the defender's clean fine-tune")
    p.add_argument("--ibvs_backdoored", type=str | None, default=None,
                   help="IBVS: the defender's self-backdoored fine-tune (same recipe and seed as --ibvs_clean)")
    p.add_argument("--ibvs_alphas", type=float, nargs="+", default=[1.0], help="IBVS: α values evaluated on every merge")
    p.add_argument("--ibvs_select", type=str | None, default="val",
                   help="'val': mark the largest α whose mean val clean accuracy drops ≤ --ibvs_max_drop (no attacker data); null: none")
    p.add_argument("--ibvs_max_drop", type=float, default=0.02, help="IBVS selection: allowed val accuracy drop (fraction)")
    p.add_argument("--defenses", type=list[dict] | None, default=None,
                   help="defenses as a list of {name, inputs, strengths, select, max_drop, init_args} (instead of --defense)")
    p.add_argument("--tasks", type=str, nargs="+", default=None, help="task of each model (default: from metadata)")
    p.add_argument("--eval_tasks", type=str, nargs="+", default=None, help="tasks to evaluate (default: the models' tasks)")
    p.add_argument("--method", type=str, default="task_arithmetic",
                   help="a registered merge method (evaluation.merge_methods.REGISTRY; an unknown name's error lists "
                        "them all) or a MergeMethod class path such as my_module.MyMethod")
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
    p.add_argument("--device", type=str, default="auto", help=DEVICE_HELP)
    p.add_argument("--synthetic_train_size", type=int, default=40000, help="synthetic tasks: the renders the fine-tunes used (val is held out of train)")
    p.add_argument("--synthetic_test_size", type=int, default=1000)
    return p


def resolve(cfg):
    """Fill the defaults that need torch or the model code (``--model_name``, ``--device auto``) and check the device
    against this machine; returns ``cfg`` (changed in place), before any work."""
    if cfg.model_name is None:
        from modeling.clip import EMBEDDED_MODEL

        cfg.model_name = EMBEDDED_MODEL
    cfg.device = resolve_device(cfg.device)
    return cfg


def build_request(cfg) -> MergeEvalRequest:
    """The evaluation request of parsed merge.py flags (``--plan`` or the single-method flags; the defense flags)."""
    from defenses import defense_setting, defense_settings
    from evaluation.merge_eval import MergeEvalRequest, PlanEntry
    from merging.io import MergeInputError

    cfg = resolve(cfg)
    plan = cfg.plan or [PlanEntry(cfg.method, coefficients=cfg.coefficients, hparams=cfg.hparams, select_on=cfg.select_on)]
    defenses = defense_settings(cfg.defenses or [])
    if cfg.defense != "none":
        if defenses:
            raise MergeInputError("pass --defense (with its --ibvs_* flags) or --defenses, not both")
        inputs = {"clean": cfg.ibvs_clean, "backdoored": cfg.ibvs_backdoored}
        defenses = [defense_setting(cfg.defense, inputs, cfg.ibvs_alphas, cfg.ibvs_select, cfg.ibvs_max_drop,
                                    sources=IBVS_FLAGS)]
    fields = ("models", "tasks", "eval_tasks", "probe_models", "probe_triggers", "zero_shot", "individual", "evaluate",
              "model_name", "pretrained", "cache_dir", "data_dirs", "batch_size", "device", "synthetic_train_size",
              "synthetic_test_size", "val_max_examples", "gram_batch_size", "engine", "merge_threads", "export")
    return MergeEvalRequest(plan=plan, defenses=defenses, **{f: getattr(cfg, f) for f in fields})


def run(cfg) -> Path | None:
    """Merge, evaluate, write results; returns the path of results.json (None without evaluation)."""
    from evaluation.merge_eval import evaluate_merges
    from evaluation.rows import rows_table, write_results
    from merging.io import check_output_path

    request = build_request(cfg)
    if cfg.evaluate:
        check_output_path(cfg.out_dir, "--out_dir", is_dir=True)
    result = evaluate_merges(request)  # validates every input before any work
    if not cfg.evaluate:
        return None
    config = {k: v for k, v in cfg.as_dict().items() if k != "config"}
    path = write_results(Path(cfg.out_dir), config, result.rows, result.eval_tasks)
    print(rows_table(result.rows, result.eval_tasks))
    return path


def main(argv=None) -> int:
    """CLI entry: exit status 0, or 2 with one line ``merge.py: error: ...`` on stderr for bad input.

    ``BADMERGING_TRACEBACK=1`` re-raises instead (full traceback). A failed run leaves no partial outputs.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    snapshot: list = []

    def body() -> None:
        args, files = take_tasks_files(argv)  # registered before any task name is read
        check_config_files(args, shipped="configs/merge/")
        parser = build_parser()
        parser.exit_on_error = False  # parse errors become one line, not usage + message
        cfg = parser.parse_args(args)
        load_tasks_files(cfg.tasks_file)  # named in a --config
        cfg.tasks_file = [*files, *cfg.tasks_file]  # recorded in results.json
        resolve(cfg)
        from evaluation.rows import OutputSnapshot

        snapshot.append(OutputSnapshot.take(cfg.out_dir if cfg.evaluate else None, cfg.export))
        path = run(cfg)
        if path is not None:
            print(path)

    return run_cli("merge.py", body, cleanup=lambda: [s.remove_partial_outputs() for s in snapshot],
                   interrupted="nothing was written (partial outputs removed; caches kept); rerun the command")


if __name__ == "__main__":
    sys.exit(main())
