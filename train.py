"""Train: clean fine-tunes, backdoor injections and stage-1 triggers through LightningCLI.

    python train.py fit --config configs/experiment/embedded_finetune.yaml --data.task shapes
    python train.py fit --config configs/experiment/vitb32_finetune.yaml --data.task eurosat \
        --data.data_dir /data/eurosat --trainer.devices 4
    python train.py fit --config ... --ckpt_path last        # resume from the newest last.ckpt of this task's runs
    python train.py fit --config configs/experiment/embedded_trigger_ontask.yaml --model UniversalTrigger ...

Runs are named by task: the logger's name gains ``_<task>`` (``outputs/finetune/embedded_shapes/version_N``).
Every run saves its resolved config (config.yaml) in its log directory; the exported encoder lands
where the ExportEncoder callback says (default <log_dir>/encoder.safetensors).

Bad input stops the run before training with exit status 2 and one line ``train.py: error: ...``
(ERRORS.md); SIGTERM (SLURM requeue, scancel) exits 143 with the checkpoints kept. Checkpoints are atomic
and resume mid-epoch on the same batches. The work is done by ``experiments.training`` (``main`` returns the
LightningCLI, ``cli_main`` the exit status), ``datamodules.resumable``, ``callbacks.checkpointing`` and
``callbacks.requeue``; the names below are re-exported for callers of ``train.main`` / ``train.cli_main``.
"""

from __future__ import annotations

import sys

from callbacks.checkpointing import AtomicCheckpointIO
from callbacks.requeue import SLURMRequeue
from experiments.training import TrainingCLI, TrainInputError, cli_main, main

__all__ = ["main", "cli_main", "TrainInputError", "TrainingCLI", "AtomicCheckpointIO", "SLURMRequeue"]

if __name__ == "__main__":
    sys.exit(cli_main())
