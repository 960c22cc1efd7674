"""Record a fingerprint of every training batch, to check that paired runs see the same clean data.

    python train.py fit ... --trainer.callbacks+ callbacks.batch_fingerprint.BatchFingerprint \
        --trainer.callbacks.init_args.path outputs/fingerprints.json

A Backdoor Vector θ_bd − θ_clean isolates the attack only when both runs draw identical clean batches
(docs/design.md §10). At each training step this writes sha256 of the batch's clean images and labels (before the
module triggers any) to ``fingerprints``; at the end of fit, to ``path`` as JSON (a list, one per step).
Two runs are paired when their lists are equal.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import lightning as L


def batch_fingerprint(batch) -> str:
    """sha256 over the bytes of every tensor of the batch (x (B, 3, S, S), y (B,)), in order."""
    digest = hashlib.sha256()
    for tensor in batch if isinstance(batch, (list, tuple)) else [batch]:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class BatchFingerprint(L.Callback):
    def __init__(self, path: str | None = None):
        super().__init__()
        self.path = path
        self.fingerprints: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.fingerprints.append(batch_fingerprint(batch))

    def on_train_end(self, trainer, pl_module) -> None:
        if self.path and trainer.is_global_zero:
            path = Path(self.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            tmp.write_text(json.dumps(self.fingerprints))
            os.replace(tmp, path)
