r"""Train: clean fine-tunes, backdoor injections and stage-1 triggers through LightningCLI.

    python train.py fit --config configs/experiment/embedded_finetune.yaml --data.task shapes
    python train.py fit --config configs/experiment/vitb32_finetune.yaml --data.task eurosat \
        --data.data_dir /data/eurosat --trainer.devices 4
    python train.py fit --config ... --ckpt_path last        # resume from the newest last.ckpt of this task's runs
    python train.py fit --config configs/experiment/embedded_trigger_ontask.yaml --model UniversalTrigger ...
    python train.py fit --tasks_file my_tasks.yaml --config ... --data.task my_task   # tasks of your own (YAML)

Runs are named by task: the logger's name gains ``_<task>`` (``outputs/finetune/embedded_shapes/version_N``).
Every run saves its resolved config (config.yaml) in its log directory; the exported encoder lands
where the ExportEncoder callback says (default <log_dir>/encoder.safetensors).

Bad input stops the run before training with exit status 2 and one line ``train.py: error: ...``
(ERRORS.md); SIGTERM (SLURM requeue, scancel) exits 143 with the checkpoints kept; Ctrl-C exits 130 with one line
``train.py: interrupted; ...`` naming the checkpoint kept. Checkpoints are atomic and resume mid-epoch on the same
batches. The work is done by ``experiments.training`` (``main`` returns the LightningCLI, ``cli_main`` the exit
status), ``datamodules.resumable``, ``callbacks.checkpointing`` and ``callbacks.requeue``; the names below are
re-exported for callers of ``train.main`` / ``train.cli_main``, imported on first use: ``python train.py --help``
(the subcommands) answers without importing Lightning, ``train.py fit --help`` needs it (LightningCLI's parser).
"""

from __future__ import annotations

import sys

__all__ = ["main", "cli_main", "TrainInputError", "TrainingCLI", "AtomicCheckpointIO", "SLURMRequeue"]  # noqa: F822

#: LightningCLI's subcommands (``LightningCLI.subcommands()``; a test keeps the two equal) and what each does
SUBCOMMANDS = {
    "fit": "train the model (validating at the configured interval), then export it",
    "validate": "one evaluation epoch over the validation split (with --ckpt_path: of that checkpoint)",
    "test": "one evaluation epoch over the test split (with --ckpt_path: of that checkpoint)",
    "predict": "run the model's predict_step over the predict data",
}

_LAZY = {"main": "experiments.training", "TrainInputError": "experiments.training", "TrainingCLI": "experiments.training",
         "AtomicCheckpointIO": "callbacks.checkpointing", "SLURMRequeue": "callbacks.requeue"}


def __getattr__(name: str):
    """The re-exported names, imported on first use (they import Lightning)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'train' has no attribute {name!r}")


def top_level_help() -> str:
    """``train.py --help``: the subcommands, without building LightningCLI's parsers (that needs Lightning)."""
    import argparse

    from experiments.cli import TASKS_FILE_HELP

    p = argparse.ArgumentParser(prog="train.py", description="\n\n".join(__doc__.split("\n\n")[:2]),
                                epilog="`train.py <subcommand> --help` lists the subcommand's options: the model, data "
                                       "and trainer keys (LightningCLI)", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", metavar="CONFIG", help="a configuration file (yaml or json) of the whole command")
    p.add_argument("--print_config", metavar="[=flags]", help="print the configuration after all other arguments and exit")
    p.add_argument("--tasks_file", metavar="PATH", help=TASKS_FILE_HELP)
    commands = p.add_subparsers(title="subcommands", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, text in SUBCOMMANDS.items():
        commands.add_parser(name, help=text)
    return p.format_help()


def cli_main(argv=None) -> int:
    """``python train.py ...``: 0; 2 with one line ``train.py: error: ...``; 143 on SIGTERM; 130 on Ctrl-C."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in (["--help"], ["-h"]):
        print(top_level_help(), end="")
        return 0
    from experiments.training import cli_main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(cli_main())
