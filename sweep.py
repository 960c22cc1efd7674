"""Sweeps: an experiment spec plus grid axes (attack × merge method × coefficient × defense × seed), one results table.

    python sweep.py --config configs/sweep/embedded_grid.yaml                 # every cell, locally (resumes)
    python sweep.py --config configs/sweep/embedded_grid.yaml --list          # the cells, numbered, and which are done
    python sweep.py --config configs/sweep/embedded_smoke.yaml --out_dir /tmp/smoke   # a reduced grid in minutes
    python sweep.py --config configs/sweep/embedded_grid.yaml --array_index 1 --array_count 4   # cells i ≡ 1 (mod 4)
    sbatch --array=0-7 scripts/slurm/sweep_array.sbatch configs/sweep/embedded_grid.yaml     # as a SLURM array
    python sweep.py --config configs/sweep/embedded_smoke.yaml --print_config  # the settings as YAML

The config names a spec (``spec:``, default configs/experiments/embedded.yaml) whose attacks, trainings and
defenses the grid takes by name. Every training and every cell's merge is a node of the experiment engine,
cached in ``<cache_dir>/artifacts`` by the same key rule as the main job (``pipeline.py``) and the BV analysis
(``bv.py``), so a cell whose recipe matches a main-job model reuses it. The table is ``<out_dir>/results.jsonl``
(one line per finished cell) and ``results.csv``; rerun the same command to resume (see experiments/sweep.py).

Bad input stops before any work with exit status 2 and one line ``sweep.py: error: ...`` naming the input and
the fix (``BADMERGING_TRACEBACK=1`` shows the traceback); see ERRORS.md. SIGUSR1 (SLURM's
``--signal=SIGUSR1@90``) requeues the array task and stops; finished cells are kept and the requeued task skips them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser

from experiments.cli import (add_tasks_file_argument, check_config_files, config_values, load_tasks_files, run_cli,
                             take_tasks_files)
from experiments.sweep import DEFAULT_SPEC, TABLE, SweepError, array_slice, list_cells, resolve, run, settings_from

PROG = "sweep.py"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0], exit_on_error=False)
    p.add_argument("--config", action=ActionConfigFile, help="the sweep YAML (configs/sweep/)")
    p.add_argument("--spec", type=str, default=DEFAULT_SPEC, help="the experiment spec the grid takes its parts from")
    add_tasks_file_argument(p)
    p.add_argument("--out_dir", type=str | None, default=None, help="default: outputs/sweep/<config file stem>")
    p.add_argument("--cache_dir", type=str, default=".cache/badmerging", help="data, heads and the artifact cache")
    p.add_argument("--tasks", type=str, nargs="+", default=None, help="tasks to merge (default: the spec's)")
    p.add_argument("--grid", type=dict, default={}, help="{attacks, methods, coefficients, defenses, seeds}")
    p.add_argument("--methods", type=dict, default={}, help="named methods: {name: {method, hparams}}")
    p.add_argument("--defenses", type=dict, default={},
                   help="named defenses: {name: {defense: <a spec defense>, strengths, select, max_drop}}")
    p.add_argument("--train_args", type=list, default=[], help="extra train.py flags of every encoder, a YAML list")
    p.add_argument("--trigger_args", type=list, default=[], help="extra train.py flags of every trigger, a YAML list")
    p.add_argument("--evaluation", type=dict, default={}, help="overrides of the spec's evaluation settings")
    p.add_argument("--array_index", type=int | None, default=None,
                   help="run only cells with index ≡ array_index (mod array_count); default: $SLURM_ARRAY_TASK_ID")
    p.add_argument("--array_count", type=int | None, default=None, help="default: $SLURM_ARRAY_TASK_COUNT")
    p.add_argument("--list", action="store_true", help="print the cells (index, array task, done or not, key) and exit")
    return p


def main(argv=None) -> int:
    """``python sweep.py``: exit status 0, or 2 with one line ``sweep.py: error: ...`` on stderr for bad input;
    130 on Ctrl-C (finished cells stay in the table, and the same command resumes)."""
    state: dict = {}

    def body() -> int:
        args, _files = take_tasks_files(sys.argv[1:] if argv is None else argv, error=SweepError)
        check_config_files(args, shipped="configs/sweep/", error=SweepError)
        a = build_parser().parse_args(args)
        load_tasks_files(a.tasks_file)  # named in the sweep config: before its task names are checked
        index, count = array_slice(a.array_index, a.array_count)
        configs = config_values(args)
        sweep = resolve(settings_from(a), configs[-1] if configs else "the sweep settings")
        state["sweep"] = sweep
        if a.list:
            print("\n".join(list_cells(sweep, count)))
            return 0
        print(run(sweep, index, count))
        return 0

    def interrupted() -> str:
        sweep = state.get("sweep")
        if sweep is None:
            return "nothing was run; rerun the command"
        return (f"every finished cell is kept in {Path(sweep.out_dir) / TABLE} (and its models in the cache); rerun the "
                "same command to resume with the cells still to do")

    return run_cli(PROG, body, interrupted=interrupted)


if __name__ == "__main__":
    sys.exit(main())
