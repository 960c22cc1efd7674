"""Export the trained image encoder as a safetensors state dict with JSON metadata, at the end of fit."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch

from merging.io import check_output_path, save_state_dict
from modeling.version import code_version


class ExportError(ValueError):
    """The export cannot be written where it is asked for; the message names the path and the fix."""


def check_writable(path: Path, what: str = "export path") -> None:
    """Refuse an output file that cannot be created or written, without creating anything."""
    check_output_path(path, what, is_dir=False, error=ExportError)


class ExportEncoder(L.Callback):
    """On fit end (rank 0), write ``pl_module.encoder.state_dict()`` to ``path``.

    ``path`` defaults to ``<trainer.log_dir>/encoder.safetensors``. Metadata = the module's
    ``export_metadata()`` plus seed, steps, final logged metrics and code version; it sits beside the
    weights as ``encoder.json`` and inside the safetensors header. The file is written atomically
    (temp name, fsync, rename). The location is checked when fit starts, so a bad path fails before
    training rather than after it; weights with NaN or inf are never exported.
    """

    def __init__(self, path: str | None = None):
        super().__init__()
        self.path = path
        self.written: Path | None = None
        self._resolved: Path | None = None

    def _target(self, trainer: L.Trainer) -> Path:
        return Path(self.path) if self.path else Path(trainer.log_dir or trainer.default_root_dir) / "encoder.safetensors"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Every rank resolves the path: trainer.log_dir is a broadcast under DDP, which hangs when only rank 0 asks.
        self._resolved = self._target(trainer)
        if stage == "fit" and trainer.is_global_zero:
            check_writable(self._resolved)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        path = self._resolved or self._target(trainer)
        state = pl_module.encoder.state_dict()
        bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
        if bad is not None:
            raise FloatingPointError(f"encoder weight {bad!r} holds NaN or inf at step {trainer.global_step}; not "
                                     f"exported to {path}: resume from an earlier checkpoint with a lower model.lr")
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = pl_module.export_metadata()
        meta.update(
            seed=int(os.environ.get("PL_GLOBAL_SEED", -1)),
            global_step=trainer.global_step,
            metrics={k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
            code_version=code_version(),
        )
        save_state_dict(path, state, meta)
        self.written = path
