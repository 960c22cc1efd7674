"""Backdoor metrics as count-based torchmetrics (docs/design.md §2, §11): ASR, robust accuracy, clean-to-target rate.

All three look only at images whose true label ≠ ``target`` (a target-class image predicted as the
target says nothing about a backdoor) and keep two summed states:

    hits  (long, scalar)  number of counted images that satisfy the metric's condition
    total (long, scalar)  number of counted images (true label ≠ target)

Both reduce with ``dist_reduce_fx="sum"``, so under DDP the rate hits/total is exact (a mean of
per-rank rates would not be with unequal shards). ``compute()`` = hits / total (0.0 when total is 0);
``counts()`` gives the reduced ``{"hits", "total"}``, to report beside the rate. Under DDP call both
on every rank (they synchronise).

    AttackSuccessRate   triggered images:      pred == target
    RobustAccuracy      triggered images:      pred == true label
    CleanToTargetRate   the same images clean: pred == target

``update(preds, labels)`` takes logits / scores (B, C) or predicted classes (B,) (integers), and the
true labels (B,). ``target = -1`` counts every image (e.g. RA of an off-task attack, whose target
class is not in this task).
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torchmetrics import Metric

__all__ = ["AttackSuccessRate", "CleanToTargetRate", "RobustAccuracy", "as_predictions"]


def as_predictions(preds_or_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Predicted classes (B,): argmax over the last dim of logits (B, C), or integer predictions (B,) as given."""
    if labels.dim() != 1:
        raise ValueError(f"labels must be (B,), got shape {tuple(labels.shape)}")
    if preds_or_logits.dim() == 2 and preds_or_logits.shape[0] == labels.shape[0]:
        return preds_or_logits.argmax(dim=-1)
    if preds_or_logits.shape == labels.shape:
        if preds_or_logits.is_floating_point():
            raise ValueError("1-D predictions must be integer classes; pass logits as (B, C)")
        return preds_or_logits
    raise ValueError(f"preds must be logits (B, C) or classes (B,) for labels of shape {tuple(labels.shape)}, "
                     f"got shape {tuple(preds_or_logits.shape)}")


class _TargetCountMetric(Metric):
    """hits / total over images with label ≠ target; subclasses say what a hit is."""

    is_differentiable = False
    higher_is_better: bool | None = None
    full_state_update = False

    hits: torch.Tensor
    total: torch.Tensor

    def __init__(self, target: int, **kwargs):
        super().__init__(**kwargs)
        if isinstance(target, bool) or not isinstance(target, int) or target < -1:
            raise ValueError(f"target={target!r} must be a class index ≥ 0 (or -1 to count every image)")
        self.target = target
        self.add_state("hits", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @abstractmethod
    def _hit(self, preds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Boolean (N,): which counted samples are hits (each subclass says what a hit is)."""

    def update(self, preds: torch.Tensor, labels: torch.Tensor) -> None:
        preds = as_predictions(preds, labels)
        counted = labels != self.target
        self.hits += self._hit(preds[counted], labels[counted]).sum()
        self.total += counted.sum()

    def compute(self) -> torch.Tensor:
        if self.total == 0:
            return torch.tensor(0.0, device=self.total.device)
        return self.hits.double().div(self.total).float()

    def counts(self) -> dict[str, int]:
        """Reduced ``{"hits": int, "total": int}`` (synchronised across processes when distributed)."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, process_group=self.process_group,
                               should_sync=self.sync_on_compute and not self._is_synced, should_unsync=True):
            return {"hits": int(self.hits), "total": int(self.total)}


class AttackSuccessRate(_TargetCountMetric):
    """ASR: on triggered images with label ≠ target, the fraction predicted as ``target``."""

    higher_is_better = True

    def _hit(self, preds, labels):
        return preds == self.target


class RobustAccuracy(_TargetCountMetric):
    """RA: on triggered images with label ≠ target, the fraction still predicted as their true label."""

    higher_is_better = True

    def _hit(self, preds, labels):
        return preds == labels


class CleanToTargetRate(_TargetCountMetric):
    """On the same images **without** the trigger, the fraction predicted as ``target``.

    An ASR means a backdoor only while this stays low (a merge can collapse onto the target class).
    """

    higher_is_better = False

    def _hit(self, preds, labels):
        return preds == self.target
