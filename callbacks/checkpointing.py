"""Checkpoint writing: a CheckpointIO plugin whose writes are atomic (temp name, fsync, rename)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO that writes to a temp file in the same directory, fsyncs, then renames.

    A crash (even SIGKILL) while a checkpoint is written leaves the previous ``last.ckpt`` intact
    instead of a truncated file that cannot be resumed from. A Lightning plugin:
    ``Trainer(plugins=[AtomicCheckpointIO()])`` (``train.py`` passes it through ``trainer_defaults``).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote filesystems: fsspec's own write
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
