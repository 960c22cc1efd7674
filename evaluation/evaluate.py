"""Evaluation of an image encoder on tasks: clean top-1 accuracy (micro) per task.

Test inputs are decoded and transformed once per task (``EvalTask``) and reused for every model
and merge coefficient; heads are the cached zero-shot heads of the base model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy
from tqdm.auto import tqdm

from datamodules.datamodule import TaskDataModule
from datamodules.tasks import get_task
from modeling.clip import BaseModel, zero_shot_head


@dataclass
class EvalTask:
    """One task's evaluation data: head (C, D) and input batches [(x (B, 3, S, S), y (B,))]."""

    name: str
    head: torch.Tensor
    batches: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def num_classes(self) -> int:
        return self.head.shape[0]

    @property
    def size(self) -> int:
        return sum(len(y) for _, y in self.batches)


def load_eval_tasks(tasks: list[str], base: BaseModel, split: str = "test", cache_dir: str = ".cache/badmerging",
                    data_dirs: dict[str, str] | None = None, batch_size: int = 512, max_examples: int | None = None,
                    **data_kwargs) -> dict[str, EvalTask]:
    """Decode each task's ``split`` ("test" or "val") once into memory (the first ``max_examples``) and build its head."""
    if split not in ("test", "val"):
        raise ValueError(f"evaluation split must be 'test' or 'val', got {split!r}")
    out = {}
    for name in tasks:
        spec = get_task(name)
        dm = TaskDataModule(task=name, data_dir=(data_dirs or {}).get(name), model_name=base.name, cache_dir=cache_dir,
                            eval_batch_size=batch_size, **data_kwargs)
        dm.prepare_data()
        dm.setup("test")
        loader = dm.test_dataloader() if split == "test" else dm.val_dataloader()
        batches, seen = [], 0
        for x, y in tqdm(loader, desc=f"decode {name}/{split}", leave=False):
            if max_examples is not None and seen + len(y) > max_examples:
                x, y = x[: max_examples - seen], y[: max_examples - seen]
            batches.append((x, y))
            seen += len(y)
            if max_examples is not None and seen >= max_examples:
                break
        out[name] = EvalTask(spec.name, zero_shot_head(base, spec, cache_dir), batches)
    return out


@torch.no_grad()
def task_features(encoder: torch.nn.Module, task: EvalTask, device: str = "cpu") -> list[torch.Tensor]:
    encoder.eval()
    return [encoder(x.to(device)) for x, _ in task.batches]


@torch.no_grad()
def clean_accuracy(encoder: torch.nn.Module, task: EvalTask, device: str = "cpu") -> float:
    """Micro top-1 accuracy of normalize(f(x)) @ head.T on the task's batches."""
    metric = MulticlassAccuracy(num_classes=task.num_classes, average="micro").to(device)
    head = task.head.to(device)
    for (x, y), f in zip(task.batches, task_features(encoder, task, device)):
        metric.update(F.normalize(f, dim=-1) @ head.T, y.to(device))
    return float(metric.compute())


def evaluate_encoder(encoder: torch.nn.Module, tasks: dict[str, EvalTask], device: str = "cpu") -> dict[str, float]:
    return {name: clean_accuracy(encoder, t, device) for name, t in tasks.items()}
