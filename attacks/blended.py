"""Blended (Chen et al.): a fixed random full-image pattern mixed in, poisoned cross-entropy."""

from __future__ import annotations

from attacks.base import PoisonedCrossEntropy
from attacks.registry import register_attack


@register_attack("blended")
class Blended(PoisonedCrossEntropy):
    """L_bd = CE(H(f_θ(x_bd)), target) with x_bd = (1 − a)·x + a·pattern, a seeded random pattern (or a file's)."""

    trigger_kind = "blend"
