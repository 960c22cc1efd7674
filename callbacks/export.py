"""Export the trained image encoder as a safetensors state dict with JSON metadata, at the end of fit."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L

from merging.io import save_state_dict
from modeling.version import code_version


class ExportEncoder(L.Callback):
    """On fit end (rank 0), write ``pl_module.encoder.state_dict()`` to ``path``.

    ``path`` defaults to ``<trainer.log_dir>/encoder.safetensors``. Metadata = the module's
    ``export_metadata()`` plus seed, steps, final logged metrics and code version; it sits beside the
    weights as ``encoder.json`` and inside the safetensors header.
    """

    def __init__(self, path: str | None = None):
        super().__init__()
        self.path = path
        self.written: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        path = Path(self.path) if self.path else Path(trainer.log_dir or trainer.default_root_dir) / "encoder.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = pl_module.export_metadata()
        meta.update(
            seed=int(os.environ.get("PL_GLOBAL_SEED", -1)),
            global_step=trainer.global_step,
            metrics={k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
            code_version=code_version(),
        )
        save_state_dict(path, pl_module.encoder.state_dict(), meta)
        self.written = path
