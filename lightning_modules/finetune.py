"""Clean fine-tuning of an open_clip image encoder against its task's frozen zero-shot head.

    python train.py fit --config configs/experiment/embedded_finetune.yaml --data.task shapes
    python train.py fit --config configs/experiment/vitb32_finetune.yaml --data.task eurosat

Defaults are the task-arithmetic reference recipe (docs/design.md §7): AdamW lr 1e-5, weight decay 0.1,
linear warm-up 500 steps then cosine to 0 per step; gradient-norm clipping 1.0 lives in the trainer
config. Only ``model.visual`` is a parameter of this module; the text tower is used once to build the
head and then dropped, so DDP never sees unused parameters.

Validation / test log ``acc`` (micro) with its counts ``acc_hits`` / ``acc_total``: the metric's
summed states, so under DDP (with the datamodule's unpadded val/test shards) they equal a
single-process evaluation exactly.
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from datamodules.tasks import get_task
from modeling.clip import EMBEDDED_MODEL, ImageClassifier, load_base_model, zero_shot_head


def warmup_cosine(warmup_steps: int, total_steps: int):
    """lr multiplier: (s+1)/warmup for s < warmup, then 0.5·(1 + cos(π·progress)) down to 0."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


class TaskModel(L.LightningModule):
    """θ (``self.encoder``, the base model's image tower) under the frozen zero-shot head H_t of one task.

    logits = H_t · normalize(f_θ(x)) (B, C). The shared loading of ``FineTune`` (which trains θ) and
    ``UniversalTrigger`` (which freezes it); the text tower builds the head and is then dropped.
    Subclasses call ``save_hyperparameters()`` themselves.
    """

    def __init__(self, task: str = "shapes", model_name: str = EMBEDDED_MODEL, pretrained: str | None = None,
                 cache_dir: str = ".cache/badmerging"):
        super().__init__()
        self.spec = get_task(task)
        base = load_base_model(model_name, pretrained)
        self.base_description = base.describe()
        head = zero_shot_head(base, self.spec, cache_dir)
        self.classifier = ImageClassifier(base.model.visual, head).train()

    @property
    def encoder(self) -> torch.nn.Module:
        return self.classifier.encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)


class FineTune(TaskModel):
    """θ_t = argmin CE(H_t(normalize(f_θ(x))), y) from θ_pre, head H_t frozen.

    Args:
        task: registered task name; its class names and templates build the head.
        model_name / pretrained: the base model (see ``modeling.clip.load_base_model``).
        lr, weight_decay, warmup_steps: the optimiser and schedule (per step, cosine to 0 at the
            trainer's last step).
        cache_dir: where zero-shot heads are cached.
    """

    def __init__(
        self,
        task: str = "shapes",
        model_name: str = EMBEDDED_MODEL,
        pretrained: str | None = None,
        lr: float = 1e-5,
        weight_decay: float = 0.1,
        warmup_steps: int = 500,
        cache_dir: str = ".cache/badmerging",
    ):
        super().__init__(task, model_name, pretrained, cache_dir)
        self.save_hyperparameters()
        n = len(self.spec.classnames)
        # validate_args=False: the checks run torch.unique on the labels, a device sync every step.
        self.train_acc = MulticlassAccuracy(num_classes=n, average="micro", validate_args=False)
        self._nonfinite: torch.Tensor | None = None
        self.val_acc = MulticlassAccuracy(num_classes=n, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=n, average="micro")
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()  # see log_eval_loss

    def _common_step(self, batch, stage: str, metric: MulticlassAccuracy) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        metric(logits, y)
        if stage == "train":
            self.log("train/loss", loss, prog_bar=True)
        else:
            self.log_eval_loss(stage, loss, len(y))
        # One tag per stage (on_step with on_epoch would split it into train/acc_step and train/acc_epoch):
        # train/acc per step (batch accuracy), val/acc and test/acc per epoch.
        self.log(f"{stage}/acc", metric, prog_bar=True, on_step=stage == "train", on_epoch=stage != "train")
        return loss

    def log_eval_loss(self, stage: str, loss: torch.Tensor, batch_size: int) -> None:
        """``<stage>/loss``, the mean over the epoch's examples, through a MeanMetric (summed states).

        Exact under DDP with unequal shards: Lightning's ``sync_dist`` mean keeps the summed batch size
        in an integer tensor and truncates its mean over ranks (21 examples on 2 ranks count as 20).
        """
        metric: MeanMetric = getattr(self, f"{stage}_loss")
        metric.update(loss.detach(), weight=batch_size)
        self.log(f"{stage}/loss", metric, on_step=False, on_epoch=True)

    def training_step(self, batch, batch_idx):
        loss = self._common_step(batch, "train", self.train_acc)
        self.check_finite(loss, "lower model.lr or check the data")
        return loss

    def check_finite(self, loss: torch.Tensor, fix: str, every: int = 25) -> None:
        """Stop training with a clear message once the loss is NaN or infinite.

        On CPU the check runs every step. On an accelerator reading the flag syncs the device, so the
        flag accumulates there and is read every ``every`` steps (and the message names the window).
        """
        bad = ~torch.isfinite(loss.detach())
        if loss.device.type == "cpu":
            if bad:
                raise FloatingPointError(f"non-finite training loss {loss.item()} at step {self.global_step}; {fix}")
            return
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad
        if self.global_step % every == 0 and bool(self._nonfinite):
            raise FloatingPointError(f"non-finite training loss within the {every} steps up to step {self.global_step}; {fix}")

    def validation_step(self, batch, batch_idx):
        self._common_step(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx):
        self._common_step(batch, "test", self.test_acc)

    @staticmethod
    def accuracy_counts(metric: MulticlassAccuracy) -> dict[str, int]:
        """``{"hits", "total"}`` of a micro accuracy: its tp and tp + fn states, summed over processes."""
        with metric.sync_context(dist_sync_fn=metric.dist_sync_fn, process_group=metric.process_group,
                                 should_sync=metric.sync_on_compute and not metric._is_synced, should_unsync=True):
            return {"hits": int(metric.tp.sum()), "total": int((metric.tp + metric.fn).sum())}

    def _log_accuracy_counts(self, stage: str) -> None:
        # counts are already summed over ranks: the sync_dist mean of equal values is exact (and silences
        # Lightning's epoch-level warning)
        counts = self.accuracy_counts(getattr(self, f"{stage}_acc"))
        self.log(f"{stage}/acc_hits", float(counts["hits"]), sync_dist=True)
        self.log(f"{stage}/acc_total", float(counts["total"]), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_accuracy_counts("val")

    def on_test_epoch_end(self) -> None:
        self._log_accuracy_counts("test")

    def configure_optimizers(self):
        h = self.hparams
        params = [p for p in self.encoder.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=h.lr, weight_decay=h.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(min(h.warmup_steps, max(1, total // 2)), total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def export_metadata(self) -> dict:
        """What made these weights: base model, task, recipe; callers add seed, attack, code version."""
        h = dict(self.hparams)
        return {"kind": "finetune", "task": self.spec.name, "base_model": self.base_description,
                "recipe": {k: h[k] for k in ("lr", "weight_decay", "warmup_steps")}, "attack": None}
