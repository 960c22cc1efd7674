"""DAM (Defense-Aware Merging, Yang et al., ICLR 2025) on a merge: θ_pre + m ⊙ (θ_merged − θ_pre), a concrete mask m
learned on unlabeled val images (``merging.dam``). The strength is DAM's safety weight w (``adv_weight``, the
code's default 0.1): the weight of the entropy on perturbed images in the mask's loss; w = 0 is the mask without
the safety term (Concrete Task Arithmetic), not the merge itself.

Data the defender needs: unlabeled val images (the held-out part of train) of the merged models' tasks — every one
by default, as DAM (and AdaMerging) adapt on every task, or those ``tasks`` names — and each task's class names
(its zero-shot head). No labels, no trigger, no target, no model of any attacker: it reads only θ_pre, the merged
weights and those images. w is selected like every defense's strength, on clean val accuracy only.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.data import DataLoader

from evaluation.merge_methods import MergeContext
from merging.dam import dam_defend
from merging.io import MergeInputError
from modeling.clip import zero_shot_head

from .registry import Defense, StateDict, register_defense

__all__ = ["DAM"]

CLAMPS = ("valid", "unit")
EVAL_MASKS = ("continuous", "discrete")


def _positive(name: str, value, integer: bool = False) -> None:
    if integer:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        kind = "a positive integer"
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
        kind = "a finite number > 0"
    if not ok:
        raise MergeInputError(f"defense dam: {name}={value!r} must be {kind}")


@register_defense
class DAM(Defense):
    """DAM's mask on every merge, learned per merge and strength (``steps`` Adam steps, batches of ``batch_size``
    val images per task); hyperparameters and defaults as ``clip_safe_concrete_task_arithmetic.yaml``.

    ``clamp``: the range perturbed images are clamped to — ``valid``, the normalised images of pixels in [0, 1],
    or ``unit``, [0, 1] on the normalised values, as the public code does (its images are CLIP-normalised too).
    ``eval_mask``: the final mask, one ``continuous`` sample (the code's default) or a ``discrete`` draw.
    ``device``: ``auto`` (cuda when available) or a torch device.
    """

    name = "dam"
    inputs = {}  # none: DAM needs no model of its own
    strength_symbol = "w"
    strength_key = "adv_weight"

    def __init__(self, steps: int = 2000, lr: float = 1e-3, adv_lr: float = 1e-4, temperature: float = 0.5,
                 initial_logits: float = 0.0, batch_size: int = 16, clamp: str = "valid",
                 eval_mask: str = "continuous", tasks: Sequence[str] | None = None, seed: int = 0,
                 device: str = "auto"):
        _positive("steps", steps, integer=True)
        _positive("batch_size", batch_size, integer=True)
        for name, value in (("lr", lr), ("adv_lr", adv_lr), ("temperature", temperature)):
            _positive(name, value)
        if isinstance(initial_logits, bool) or not isinstance(initial_logits, (int, float)) or not math.isfinite(initial_logits):
            raise MergeInputError(f"defense dam: initial_logits={initial_logits!r} must be a finite number (0: p = 0.5)")
        if clamp not in CLAMPS:
            raise MergeInputError(f"defense dam: clamp={clamp!r} must be one of {', '.join(CLAMPS)}")
        if eval_mask not in EVAL_MASKS:
            raise MergeInputError(f"defense dam: eval_mask={eval_mask!r} must be one of {', '.join(EVAL_MASKS)}")
        if tasks is not None and (isinstance(tasks, str) or not isinstance(tasks, Sequence) or not tasks):
            raise MergeInputError(f"defense dam: tasks={tasks!r} must be a non-empty list of the merged models' tasks "
                                  "(or null: all of them)")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise MergeInputError(f"defense dam: seed={seed!r} must be an integer")
        self.hparams = {"steps": steps, "lr": lr, "adv_lr": adv_lr, "temperature": temperature,
                        "initial_logits": initial_logits, "batch_size": batch_size, "clamp": clamp,
                        "eval_mask": eval_mask, "seed": seed}
        self.tasks = None if tasks is None else list(tasks)
        self.device = device
        self._prepared = False
        self._cache: tuple[StateDict, dict[float, StateDict]] | None = None

    def prepare(self, context: MergeContext, inputs: dict[str, str]) -> None:
        """θ_pre, the zero-shot head and the val split of each data task; a private copy of the encoder."""
        from datamodules.tasks import get_task

        merged_tasks = list(dict.fromkeys(get_task(t).name for t in context.tasks))
        tasks = merged_tasks if self.tasks is None else [get_task(t).name for t in self.tasks]
        outside = [t for t in tasks if t not in merged_tasks]
        if outside:
            raise MergeInputError(f"defense dam: tasks {outside} are not among the merged models' tasks "
                                  f"{merged_tasks}; name those, or null for all")
        self.data_tasks = list(dict.fromkeys(tasks))
        device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        self._device = torch.device(device)
        base = context.base
        self.theta_pre = context.theta_pre
        self.image_shape = (3, base.image_size, base.image_size)
        self.heads = [zero_shot_head(base, get_task(t), context.cache_dir).to(self._device) for t in self.data_tasks]
        # labels are never read: the loaders' (x, y) batches are cut to x in ``_batches``
        self.datasets = [context.datamodule(t, self.hparams["batch_size"]).dataset("val") for t in self.data_tasks]
        # a copy: the run's own encoder stays where it is and keeps its weights
        self.encoder = copy.deepcopy(base.model.visual).float().eval().requires_grad_(False).to(self._device)
        mean, std = torch.tensor(base.mean).view(3, 1, 1), torch.tensor(base.std).view(3, 1, 1)
        self.bounds = ((0 - mean) / std, (1 - mean) / std) if self.hparams["clamp"] == "valid" else (0.0, 1.0)
        self._prepared, self._cache = True, None

    def _forward(self, params: StateDict, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Logits of every task's images in one encoder pass with ``params``."""
        features = F.normalize(functional_call(self.encoder, params, (torch.cat(list(xs)),)), dim=-1)
        return [f @ head.T for f, head in zip(features.split([len(x) for x in xs]), self.heads)]

    def _batches(self, generator: torch.Generator):
        """next_batch(t): the images of a fresh shuffled batch of task t's val split (epochs cycle)."""
        size = self.hparams["batch_size"]
        loaders = [DataLoader(d, batch_size=size, shuffle=True, drop_last=len(d) >= size, generator=generator)
                   for d in self.datasets]
        iters = [iter(loader) for loader in loaders]

        def next_batch(t: int) -> torch.Tensor:
            try:
                x, _labels = next(iters[t])
            except StopIteration:
                iters[t] = iter(loaders[t])
                x, _labels = next(iters[t])
            return x
        return next_batch

    def apply(self, merged: StateDict, strength: float) -> StateDict:
        """The mask learned on this merge at w = ``strength`` (cached per merge: selection and report reuse it)."""
        if not self._prepared:
            raise RuntimeError("DAM.apply before prepare: call prepare(context, inputs) first")
        if self._cache is None or self._cache[0] is not merged:  # holding the merge keeps its id from being reused
            self._cache = (merged, {})
        done = self._cache[1]
        if strength not in done:
            h = self.hparams
            data_gen = torch.Generator().manual_seed(h["seed"])
            noise_gen = torch.Generator(device=self._device).manual_seed(h["seed"])
            train = {k: h[k] for k in ("steps", "lr", "adv_lr", "initial_logits")}
            done[strength] = dam_defend(self.theta_pre, merged, self._forward, self._batches(data_gen),
                                        len(self.data_tasks), self.image_shape, eval_mask=h["eval_mask"],
                                        temperature=h["temperature"], generator=noise_gen, adv_weight=float(strength),
                                        bounds=self.bounds, device=self._device, **train)
        return dict(done[strength])

    def describe(self, strength: float, inputs: dict[str, Any]) -> dict:
        return {"name": self.name, self.strength_key: strength, **self.hparams,
                "data": {"split": "val", "tasks": list(getattr(self, "data_tasks", self.tasks) or []), "labels": False}}
