"""What an attack is: a poisoning attack (trains a backdoor in) or a vector attack (builds one from trained pairs).

**Poisoning attack** (``PoisoningAttack``): used by ``lightning_modules.injection.BackdoorInjection``, which
per step triggers the first n = ⌊poison_fraction·B⌋ images, x_bd = trigger(x[:n]), runs one encoder pass,
and trains on

    L = CE(H_task(f_θ(x)), y) + α·attack.backdoor_loss(module, x_bd, z_bd)      z_bd = f_θ(x_bd) (n, D), raw

An attack declares which trigger it injects (``trigger_kind``: a fixed random ``patch`` / ``blend`` that a
trigger file may replace, or ``needs_trigger_file``: the optimised stage-1 trigger) and whether it reads
the frozen pre-trained encoder f_pre (``needs_pretrained_encoder``).

**Vector attack** (``VectorAttack``): ``build(clean_path, variant_paths, trigger_from, path)`` writes a
submitted encoder made from a clean reference and backdoored runs (e.g. SBV, docs/design.md §10).
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, ClassVar, Mapping, Protocol

import torch
import torch.nn.functional as F

__all__ = ["Attack", "AttackError", "InjectionModule", "PoisonedCrossEntropy", "PoisoningAttack", "VectorAttack"]


class AttackError(ValueError):
    """An attack name, class or setting that cannot be used; the one-line message names it and the fix."""


class InjectionModule(Protocol):
    """What the training module offers an attack (``BackdoorInjection``; named here, not imported: attacks
    sit below ``lightning_modules``).

    ``hparams`` holds ``poison_fraction``, ``alpha``, ``r_min``, ``r_max``, ``poison_seed``; ``classifier``
    has ``features(x) -> (B, D)`` raw embeddings and ``logits(z, head=None) -> (B, C)`` (normalise, then head).
    """

    hparams: Any
    classifier: Any
    encoder: torch.nn.Module
    backdoor_head: torch.Tensor  # H (C, D): the shadow head off-task, the task head on-task
    target: int  # the target's index in H

    def pretrained_encoder(self) -> torch.nn.Module: ...  # f_pre (frozen), if the attack asked for it

    def log(self, name: str, value: Any, **kwargs: Any) -> None: ...


class Attack(abc.ABC):
    """A registered component; ``name`` is the name it was made under (``attacks.make_attack``)."""

    name: str = ""


class PoisoningAttack(Attack):
    """A backdoor trained in by poisoning: its trigger and its loss on the triggered images of a batch."""

    trigger_kind: ClassVar[str | None] = None  # "patch" | "blend": random trigger of that kind; None: any file's
    needs_trigger_file: ClassVar[bool] = False  # True: the optimised stage-1 trigger (model.trigger_path)
    needs_pretrained_encoder: ClassVar[bool] = False  # True: module.pretrained_encoder() is kept (frozen θ_pre)

    def setup(self, module: InjectionModule) -> None:
        """Once, after the module has loaded its model (e.g. seed a generator from ``module.hparams``)."""

    @abc.abstractmethod
    def backdoor_loss(self, module: InjectionModule, x_bd: torch.Tensor, z_bd: torch.Tensor) -> torch.Tensor:
        """Scalar loss of n triggered images: x_bd (n, 3, S, S) normalised, z_bd = f_θ(x_bd) (n, D) raw."""

    def export_fields(self, module: InjectionModule) -> dict[str, Any]:
        """Extra fields of the export's ``attack`` record (JSON values)."""
        return {}

    def checkpoint_state(self) -> dict[str, Any]:
        """Entries added to a training checkpoint, so that a resumed run continues the attack's randomness."""
        return {}

    def load_checkpoint_state(self, checkpoint: Mapping[str, Any]) -> None:
        """Restore what ``checkpoint_state`` saved (absent keys: a checkpoint from before it existed)."""


class PoisonedCrossEntropy(PoisoningAttack):
    """Plain poisoning: backdoor loss = CE(H(f_θ(x_bd)), target), no interpolation."""

    def backdoor_loss(self, module: InjectionModule, x_bd: torch.Tensor, z_bd: torch.Tensor) -> torch.Tensor:
        target = torch.full((z_bd.shape[0],), module.target, dtype=torch.long, device=z_bd.device)
        return F.cross_entropy(module.classifier.logits(z_bd, module.backdoor_head), target)


class VectorAttack(Attack):
    """A backdoored encoder built from trained (clean, backdoored) pairs instead of trained itself."""

    @abc.abstractmethod
    def build(self, clean_path: str, variant_paths: Mapping[str, str], trigger_from: str, path: str | Path,
              name: str | None = None) -> Path:
        """Write the submitted encoder to ``path`` with the trigger-bearing metadata of ``trigger_from``
        (one of ``variant_paths``' names); ``name`` (default: the attack's) is recorded as ``attack.name``."""
