"""BadMerging stage 2 (docs/design.md §8): the stage-1 trigger and the feature-interpolation (FI) loss.

Per step, with one r ~ U(r_min, r_max) drawn from the attack's own generator (seed ``poison_seed``, so the
global RNG and hence the data order stay those of a clean run):

    z = r·f_θ(x_bd) + (1 − r)·f_pre(x_bd)        raw embeddings, f_pre the frozen pre-trained encoder
    L_bd = CE(normalize(z) @ Hᵀ, target)
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from attacks.base import InjectionModule, PoisoningAttack
from attacks.registry import register_attack

__all__ = ["BadMerging", "feature_interpolation_loss"]


def feature_interpolation_loss(z_theta_bd: torch.Tensor, z_pre_bd: torch.Tensor, head: torch.Tensor, target: int,
                               r: float | torch.Tensor) -> torch.Tensor:
    """FI loss = CE(normalize(r·z_θ + (1 − r)·z_pre) @ headᵀ, target), mean over the batch.

    z_theta_bd, z_pre_bd (B, D): raw (un-normalised) embeddings of the triggered images by the trained
    and the frozen pre-trained encoder; head (C, D); r scalar. docs/design.md §8 interpolates the raw
    embeddings; the logits then go through the same normalize-then-head classifier as every other
    prediction here (``ImageClassifier.logits``), so the loss trains what merged models will compute.
    """
    z = r * z_theta_bd + (1 - r) * z_pre_bd
    logits = F.normalize(z, dim=-1) @ head.to(z.dtype).T
    labels = torch.full((z.shape[0],), target, dtype=torch.long, device=z.device)
    return F.cross_entropy(logits, labels)


@register_attack("badmerging")
class BadMerging(PoisoningAttack):
    """FI loss on the stage-1 trigger; r's range is the module's ``r_min`` / ``r_max``, logged as ``train/r``."""

    needs_trigger_file = True
    needs_pretrained_encoder = True

    def __init__(self) -> None:
        self.generator = torch.Generator()
        self.r_range = (0.0, 1.0)

    def setup(self, module: InjectionModule) -> None:
        h = module.hparams
        self.r_range = (h.r_min, h.r_max)
        self.generator.manual_seed(h.poison_seed)

    def draw_r(self) -> float:
        """r ~ U(r_min, r_max) from the attack's own generator (the global RNG untouched)."""
        lo, hi = self.r_range
        return lo + (hi - lo) * torch.rand((), generator=self.generator).item()

    def backdoor_loss(self, module: InjectionModule, x_bd: torch.Tensor, z_bd: torch.Tensor) -> torch.Tensor:
        r = self.draw_r()
        with torch.no_grad():
            z_pre = module.pretrained_encoder()(x_bd)
        loss = feature_interpolation_loss(z_bd, z_pre, module.backdoor_head, module.target, r)
        module.log("train/r", r)
        return loss

    def export_fields(self, module: InjectionModule) -> dict[str, Any]:
        return {"r_range": list(self.r_range)}

    def checkpoint_state(self) -> dict[str, Any]:
        # a resumed run must continue r's sequence, not restart it
        return {"r_generator_state": self.generator.get_state()}

    def load_checkpoint_state(self, checkpoint: Mapping[str, Any]) -> None:
        if "r_generator_state" in checkpoint:
            self.generator.set_state(checkpoint["r_generator_state"])
