"""BadNets (Gu et al.): a fixed random patch (``TriggerSpec.seed``), poisoned cross-entropy, no interpolation."""

from __future__ import annotations

from attacks.base import PoisonedCrossEntropy
from attacks.registry import register_attack


@register_attack("badnets")
class BadNets(PoisonedCrossEntropy):
    """L_bd = CE(H(f_θ(x_bd)), target) with x_bd = m·P + (1 − m)·x, P a seeded random patch (or a file's)."""

    trigger_kind = "patch"
