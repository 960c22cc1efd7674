"""IBVS (Injection BV Subtraction): θ_defended = θ_merged − α·BV_inj, BV_inj = θ_defender_bd − θ_defender_clean.

The defender knows nothing of the attack: it fine-tunes a clean model and a self-backdoored one (its own simple
trigger and target, same recipe and seed) on a task it has data for, and subtracts α times their difference
from the merged model. α is selected on clean val data only (``Defense.select_strength``).
"""

from __future__ import annotations

from evaluation.inputs import check_base, model_metadata
from evaluation.merge_methods import MergeContext
from merging.backdoor_vectors import backdoor_vector, ibvs_defend
from merging.io import load_state_dict
from merging.streaming import validate_inputs

from .registry import Defense, StateDict, register_defense


@register_defense
class IBVS(Defense):
    name = "ibvs"
    inputs = {"clean": "the defender's own clean fine-tune (bv.py / pipeline.py train it)",
              "backdoored": "the defender's own self-backdoored fine-tune, same recipe and seed as clean "
                            "(bv.py / pipeline.py train it)"}
    strength_symbol = "α"
    strength_key = "alpha"

    def __init__(self):
        self.vector: StateDict | None = None

    def prepare(self, context: MergeContext, inputs: dict[str, str]) -> None:
        """BV_inj of the defender's pair, both checked against the base model θ_pre."""
        clean, backdoored = inputs["clean"], inputs["backdoored"]
        for path in (clean, backdoored):
            check_base(path, model_metadata(path), context.base.base_id)
        validate_inputs(context.theta_pre, [clean, backdoored], pretrained_name=f"θ_pre ({context.base.base_id})")
        self.vector = backdoor_vector(load_state_dict(backdoored), load_state_dict(clean))

    def apply(self, merged: StateDict, strength: float) -> StateDict:
        if self.vector is None:
            raise RuntimeError("IBVS.apply before prepare: call prepare(context, inputs) first")
        return ibvs_defend(merged, self.vector, strength)
