""""UT only" (BadMerging's ablation): the optimised stage-1 trigger with plain poisoned CE, no interpolation."""

from __future__ import annotations

from attacks.base import PoisonedCrossEntropy
from attacks.registry import register_attack


@register_attack("ut_only")
class UTOnly(PoisonedCrossEntropy):
    """L_bd = CE(H(f_θ(x_bd)), target), x_bd pasted with the trigger file's (universal) trigger."""

    needs_trigger_file = True
