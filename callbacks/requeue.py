"""SLURM auto-requeue acted on at a training-batch end that all ranks agree on (``SLURMRequeue``)."""

from __future__ import annotations

import signal
import sys
import time

import torch
from lightning.pytorch import Callback

__all__ = ["SLURMRequeue"]


class SLURMRequeue(Callback):
    """Lightning's SLURM auto-requeue (``SLURMEnvironment(auto_requeue=True)``), acted on at a batch end.

    Lightning's handler for the requeue signal (SIGUSR1; ``sbatch --signal=SIGUSR1@90``) saves
    ``hpc_ckpt_<n>.ckpt`` in ``default_root_dir`` and runs ``scontrol requeue`` inside the signal handler,
    i.e. at whatever line each rank is executing: mid-step (a checkpoint whose weights and progress
    disagree) or, under DDP, between collectives (its barrier then meets another rank's all-reduce).
    Here the signal only sets a flag. At the end of every training batch the ranks sum their flags
    (one all-reduce of one integer); once any rank has it, all run Lightning's handler at that same
    point, where a checkpoint is as consistent as ModelCheckpoint's, then wait up to ``wait_s`` for
    SLURM's SIGTERM and stop (no export: the requeued job finishes the run). Inactive outside SLURM
    or without auto-requeue.
    """

    def __init__(self, wait_s: float = 120.0):
        self.wait_s = wait_s
        self.signum: int | None = None
        self.requested = False
        self.requeued = False
        self._lightning_handler = None

    def on_train_start(self, trainer, pl_module) -> None:
        from lightning.fabric.plugins.environments import SLURMEnvironment
        from lightning.pytorch.trainer.connectors.signal_connector import _HandlersCompose

        env = trainer._accelerator_connector.cluster_environment
        if not (isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal is not None):
            return
        handler = signal.getsignal(env.requeue_signal)
        if not isinstance(handler, _HandlersCompose):  # Lightning did not register one (another handler was there)
            return
        self.signum, self._lightning_handler = env.requeue_signal, handler
        signal.signal(env.requeue_signal, self._note)

    def _note(self, signum, frame) -> None:
        self.requested = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._lightning_handler is None or self.requeued:
            return
        flag = torch.tensor([int(self.requested)], device=pl_module.device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="sum")
        if not int(flag.item()):
            return
        self.requeued = True
        print(f"train.py: requeue signal: checkpoint at step {trainer.global_step}, then scontrol requeue",
              file=sys.stderr, flush=True)
        self._lightning_handler(self.signum, None)  # hpc checkpoint on every rank, requeue from rank 0
        deadline = time.monotonic() + self.wait_s
        while time.monotonic() < deadline and not trainer.received_sigterm:
            time.sleep(0.2)  # SLURM's SIGTERM interrupts the sleep; Lightning's handler sets the flag
        if trainer.received_sigterm:
            from lightning.pytorch.utilities.exceptions import SIGTERMException

            raise SIGTERMException()  # stops fit on every rank: the requeued job continues the run
        print(f"train.py: warning: no SIGTERM {self.wait_s:g} s after the requeue request; training on",
              file=sys.stderr, flush=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._lightning_handler is not None and self.signum is not None:
            signal.signal(self.signum, self._lightning_handler)
