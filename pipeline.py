"""The main job: run an experiment spec (the embedded default unless --spec names another), end to end, cached.

    python pipeline.py                          # configs/experiments/embedded.yaml; the last line is results.json's path
    python pipeline.py --quick                  # a reduced run (tests, smoke checks)
    python pipeline.py --attacks none           # clean fine-tunes and merges only
    python pipeline.py --methods ta             # the Task Arithmetic curve only
    python pipeline.py --executor slurm         # every node as a SLURM job (array per wave) through submitit
    python pipeline.py --print_config           # this command's settings as YAML (reusable with --config)

Every training, vector attack and merge scenario is a node of one job graph (experiments/), cached by a
content hash of its recipe under ``<cache_dir>/artifacts``: a rerun, a sweep or the BV analysis with the same
recipe reuses it. Outputs in ``<out_dir>``: results.json / results.csv, summary.md, asr_ca_vs_coefficient.png,
spec.yaml (the resolved spec), models/ and tensorboard/.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

from experiments.cli import add_tasks_file_argument, check_config_files, load_tasks_files, run_cli, take_tasks_files

# the engine (torch, Lightning, open_clip) is imported once the flags are parsed: ``pipeline.py --help`` stays fast
DEFAULT_SPEC = "configs/experiments/embedded.yaml"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="pipeline.py", description=__doc__.splitlines()[0], exit_on_error=False)
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file of these settings")
    p.add_argument("--spec", type=str, default=DEFAULT_SPEC, help="the experiment spec (configs/experiments/)")
    add_tasks_file_argument(p)
    p.add_argument("--out_dir", type=str, default="outputs/default")
    p.add_argument("--cache_dir", type=str, default=".cache/badmerging", help="data, heads and the artifact cache")
    p.add_argument("--tasks", type=str, nargs="+", default=None, help="a subset of the spec's tasks")
    p.add_argument("--coefficients", type=float, nargs="+", default=None, help="the TA λ grid (default: the spec's)")
    p.add_argument("--quick", action=ActionYesNo, default=False, help="reduced run: few steps, small data (tests)")
    p.add_argument("--jobs", type=int | None, default=None,
                   help="local worker processes, one torch thread each (1: inline; default: 1 with --quick, "
                        "else min(CPU count, 4))")
    p.add_argument("--methods", type=str, default="all", help="all: every plan entry; ta: the TA curve only")
    p.add_argument("--attacks", type=str, nargs="+", default=None, help="a subset of the spec's attacks, or none")
    p.add_argument("--defense", type=str, default="all", help="all: the spec's defenses; none; or one defense name")
    p.add_argument("--train_overrides", type=list[str], default=[],
                   help="extra train.py flags for every training (in their keys), e.g. '[--trainer.max_steps, \"50\"]'")
    p.add_argument("--executor", type=str, default="local", help="local | slurm (submitit job arrays)")
    p.add_argument("--slurm_folder", type=str, default="outputs/slurm", help="submitit's logs and job pickles")
    p.add_argument("--slurm_partition", type=str | None, default=None)
    p.add_argument("--slurm_timeout_min", type=int, default=240)
    p.add_argument("--slurm_gpus_per_node", type=int, default=0)
    return p


def main(argv=None) -> int:
    """``python pipeline.py``: 0 (the last line printed is results.json's path); 2 with one line
    ``pipeline.py: error: ...`` for bad input; 130 on Ctrl-C. A failed or interrupted run removes the ``--out_dir``
    it created; the cache keeps every finished node, so the same command resumes."""
    from experiments.cli import UserError

    state: dict = {}

    def body() -> int:
        args, files = take_tasks_files(sys.argv[1:] if argv is None else argv)  # before the spec's task names are read
        check_config_files(args, shipped="configs/")
        a = build_parser().parse_args(args)
        load_tasks_files(a.tasks_file)  # named in a --config
        a.tasks_file = [*files, *a.tasks_file]
        if a.methods not in ("all", "ta"):
            raise UserError(f"--methods={a.methods!r}; use all or ta")
        if a.executor not in ("local", "slurm"):
            raise UserError(f"--executor={a.executor!r}; use local or slurm")
        from evaluation.rows import OutputSnapshot
        from experiments.run import run_pipeline

        state.update(args=a, created=OutputSnapshot.take(a.out_dir, None).created_root)
        print(run_pipeline(a))
        return 0

    def cleanup() -> None:
        created = state.get("created")
        if created is not None and created.is_dir():  # the whole --out_dir is this run's: spec.yaml, models/ links
            shutil.rmtree(created, ignore_errors=True)

    def interrupted() -> str:
        a = state.get("args")
        if a is None:
            return "nothing was run; rerun the command"
        slurm = " (submitted SLURM jobs keep running: scancel them, or let them finish into the cache)" \
            if a.executor == "slurm" else ""
        artifacts = Path(a.cache_dir) / "artifacts"
        return (f"finished steps are kept in {artifacts} (an unfinished training's checkpoints in {artifacts / '.work'})"
                f"{slurm}; rerun the same command to resume from there")

    return run_cli("pipeline.py", body, cleanup=cleanup, interrupted=interrupted)


if __name__ == "__main__":
    sys.exit(main())
