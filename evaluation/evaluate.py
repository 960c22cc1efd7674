"""Evaluation of an image encoder on tasks: clean top-1 accuracy (micro) per task, and backdoor metrics.

Test inputs are decoded and transformed once per task (``EvalTask``) and reused for every model
and merge coefficient; heads are the cached zero-shot heads of the base model.

Backdoors are measured with ``AttackProbe``s (a trigger, a target task and class): ``evaluate``
runs one encoder pass per batch over the clean images and, for each probe aimed at that task, the
same images with its trigger pasted, and reads clean accuracy, ASR, RA and the clean-to-target rate
off those features (docs/design.md §11: target-class images excluded from the three attack rates).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy
from tqdm.auto import tqdm

from datamodules.datamodule import TaskDataModule
from datamodules.tasks import get_task
from datamodules.triggers import TriggerSpec, apply_trigger, trigger_from_attack
from lightning_modules.attack_metrics import AttackSuccessRate, CleanToTargetRate, RobustAccuracy
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


@dataclass
class AttackProbe:
    """A trigger aimed at ``target_class`` of ``target_task`` (trigger (3, L, L) patch or (3, S, S) pattern)."""

    name: str
    trigger: torch.Tensor
    spec: TriggerSpec
    target_task: str
    target_class: int
    attack: dict  # the exported ``attack`` metadata (name, trigger spec, target, ...)

    @classmethod
    def from_metadata(cls, name: str, attack: dict, image_size: int) -> "AttackProbe":
        tensor, spec = trigger_from_attack(attack, image_size)
        return cls(name, tensor, spec, attack["target_task"], int(attack["target_task_class"]), dict(attack))

    def describe(self) -> dict:
        """JSON-able attack spec for result rows (without the trigger's values)."""
        keep = ("name", "mode", "trigger", "target_task", "target_task_class", "target_name", "off_task", "alpha", "r_range",
                "poison_fraction")
        return {"label": self.name, **{k: self.attack[k] for k in keep if k in self.attack}}


@torch.inference_mode()
def evaluate(encoder: torch.nn.Module, tasks: dict[str, EvalTask], probes: list[AttackProbe] = (),
             device: str = "cpu") -> tuple[dict[str, float], dict[str, dict]]:
    """(clean accuracy per task, {probe name: {asr, ra, clean_to_target, *_hits, *_total}}).

    One forward per batch over [x; trigger_1(x); ...] for the probes aimed at that task, so every
    image is decoded once and its clean features serve both the accuracy and the clean-to-target rate.
    """
    encoder.eval()
    accs, attacks = {}, {}
    for name, task in tasks.items():
        mine = [p for p in probes if p.target_task == name]
        head = task.head.to(device)
        # validate_args=False: its checks (torch.unique on the labels) cost ~5% of a tiny model's pass.
        acc = MulticlassAccuracy(num_classes=task.num_classes, average="micro", validate_args=False).to(device)
        metrics = [(AttackSuccessRate(p.target_class), RobustAccuracy(p.target_class), CleanToTargetRate(p.target_class))
                   for p in mine]
        metrics = [tuple(m.to(device) for m in ms) for ms in metrics]
        for x, y in task.batches:
            x, y = x.to(device), y.to(device)
            views = [x] + [apply_trigger(x, p.trigger.to(device), p.spec) for p in mine]
            logits = F.normalize(encoder(torch.cat(views)), dim=-1) @ head.T
            preds = logits.view(len(views), x.shape[0], -1).argmax(-1)  # one argmax per view, shared by the metrics
            acc.update(preds[0], y)
            for i, (asr, ra, c2t) in enumerate(metrics, start=1):
                asr.update(preds[i], y)
                ra.update(preds[i], y)
                c2t.update(preds[0], y)
        accs[name] = float(acc.compute())
        for p, ms in zip(mine, metrics):
            out = {}
            for key, m in zip(("asr", "ra", "clean_to_target"), ms):
                out[key] = float(m.compute())
                counts = m.counts()
                out[f"{key}_hits"], out[f"{key}_total"] = counts["hits"], counts["total"]
            attacks[p.name] = out
    return accs, attacks
