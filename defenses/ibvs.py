"""IBVS (Injection BV Subtraction): θ_defended = θ_merged − α·BV_inj, BV_inj = θ_defender_bd − θ_defender_clean.

The defender knows nothing of the attack: it fine-tunes a clean model and a self-backdoored one (its own simple
trigger and target, same recipe and seed) on a task it has data for, and subtracts α times their difference
from the merged model. α is selected on clean val data only (``Defense.select_strength``).

Variants are configurations of this one defense (init_args; merging.backdoor_vectors.injection_vector):

    BV_i     = θ_bd_i − θ_clean_i                 backdoored: one model or a list; clean: one, or one per backdoored
    BV_inj   = topk( restrict( project_out( combine(BV_1 … BV_K) ) ) )
    combine      mean | sum | elect               (K = 1: BV_1 itself)
    project_out  merged: u = θ_merged − θ_pre (per merge) | defender_clean: u = mean of θ_clean_i − θ_pre
    restrict     glob patterns of keys or blocks  ("transformer.resblocks.3", "*.mlp.*"); zero elsewhere
    topk         % of |BV_inj| kept, per tensor (topk_scope: tensor) or over all kept keys (global)
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

from evaluation.inputs import check_base, model_metadata
from evaluation.merge_eval import DefenseSetting
from evaluation.merge_methods import MergeContext
from merging.backdoor_vectors import (
    COMBINE_METHODS,
    backdoor_vector,
    ibvs_defend,
    injection_vector,
    matching_keys,
)
from merging.io import MergeInputError, load_state_dict
from merging.streaming import validate_inputs
from merging.task_vectors import task_vector

from .registry import Defense, StateDict, register_defense

PROJECT_OUT = ("merged", "defender_clean")
TOPK_SCOPES = ("tensor", "global")


def as_paths(value) -> list:
    """One input path or a list of them, as a list (the list itself is checked by ``defender_pairs``)."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def defender_pairs(clean, backdoored, where_clean: str = "inputs.clean",
                   where_backdoored: str = "inputs.backdoored") -> list[tuple[str, str]]:
    """(clean, backdoored) per BV: ``backdoored`` one path or a non-empty list; ``clean`` one path (shared by every
    backdoored model) or a list of the same length (pairs)."""
    cleans, bds = as_paths(clean), as_paths(backdoored)
    for where, paths in ((where_clean, cleans), (where_backdoored, bds)):
        if not paths:
            raise MergeInputError(f"{where} is an empty list; give at least one exported encoder (.safetensors)")
        bad = next((p for p in paths if not isinstance(p, (str, os.PathLike))), None)
        if bad is not None:
            raise MergeInputError(f"{where}: {bad!r} is not a path; give a path or a list of paths")
    if len(cleans) not in (1, len(bds)):
        raise MergeInputError(f"{where_clean}: {len(cleans)} clean models for {len(bds)} backdoored ones; give one "
                              "clean model (shared by all) or one per backdoored model, in the same order")
    return [(str(cleans[0] if len(cleans) == 1 else cleans[i]), str(b)) for i, b in enumerate(bds)]


@register_defense
class IBVS(Defense):
    name = "ibvs"
    inputs = {"clean": "the defender's own clean fine-tune (bv.py / pipeline.py train it)",
              "backdoored": "the defender's own self-backdoored fine-tune, same recipe and seed as clean "
                            "(bv.py / pipeline.py train it)"}
    strength_symbol = "α"
    strength_key = "alpha"

    def __init__(self, combine: str = "mean", restrict: Sequence[str] | None = None, topk: float | None = None,
                 topk_scope: str = "tensor", project_out: str | None = None):
        if combine not in COMBINE_METHODS:
            raise MergeInputError(f"ibvs: combine={combine!r} is unknown; use one of {', '.join(COMBINE_METHODS)}")
        if restrict is not None and (isinstance(restrict, str) or not isinstance(restrict, (list, tuple)) or not restrict
                                     or not all(isinstance(p, str) and p for p in restrict)):
            raise MergeInputError(f"ibvs: restrict={restrict!r} must be a non-empty list of glob patterns of keys or "
                                  "blocks, e.g. ['transformer.resblocks.3']")
        if topk is not None and (isinstance(topk, bool) or not isinstance(topk, (int, float))
                                 or not (math.isfinite(topk) and 0 < topk <= 100)):
            raise MergeInputError(f"ibvs: topk={topk!r} must be a percentage in (0, 100] of |BV_inj| kept, e.g. 10")
        if topk_scope not in TOPK_SCOPES:
            raise MergeInputError(f"ibvs: topk_scope={topk_scope!r} is unknown; use tensor or global")
        if project_out not in (None, *PROJECT_OUT):
            raise MergeInputError(f"ibvs: project_out={project_out!r} is unknown; use merged, defender_clean or null")
        self.combine, self.restrict, self.topk = combine, None if restrict is None else list(restrict), topk
        self.topk_scope, self.project_out = topk_scope, project_out
        self.vector: StateDict | None = None  # BV_inj when it does not depend on the merge
        self.vectors: list[StateDict] = []  # the defender's BVs
        self.theta_pre: StateDict | None = None

    def options(self) -> dict:
        """The init_args that differ from the plain defense (what an export records)."""
        defaults = {"combine": "mean", "restrict": None, "topk": None, "topk_scope": "tensor", "project_out": None}
        values = {"combine": self.combine, "restrict": self.restrict, "topk": self.topk, "topk_scope": self.topk_scope,
                  "project_out": self.project_out}
        return {k: v for k, v in values.items() if v != defaults[k]}

    def validate(self, setting: DefenseSetting) -> None:
        """The base checks for every (clean, backdoored) pair of the inputs, after the lists themselves."""
        given = setting.inputs
        if given.get("clean") is not None and given.get("backdoored") is not None:
            pairs = defender_pairs(given["clean"], given["backdoored"], setting.where("inputs.clean"),
                                   setting.where("inputs.backdoored"))
            for clean, backdoored in pairs:
                super().validate(dataclasses.replace(setting, inputs={**given, "clean": clean, "backdoored": backdoored}))
            return
        first = {k: (v[0] if v else None) if isinstance(v, (list, tuple)) else v for k, v in given.items()}
        super().validate(dataclasses.replace(setting, inputs=first))  # names the missing input

    def prepare(self, context: MergeContext, inputs: dict) -> None:
        """The defender's BVs, every model checked against the base model θ_pre; BV_inj unless it needs the merge."""
        pairs = defender_pairs(inputs["clean"], inputs["backdoored"])
        paths = list(dict.fromkeys(p for pair in pairs for p in pair))
        for path in paths:
            check_base(path, model_metadata(path), context.base.base_id)
        validate_inputs(context.theta_pre, paths, pretrained_name=f"θ_pre ({context.base.base_id})")
        states = {p: load_state_dict(p) for p in paths}
        self.vectors = [backdoor_vector(states[b], states[c]) for c, b in pairs]
        self.theta_pre = context.theta_pre
        direction = None
        if self.project_out == "defender_clean":
            cleans = list(dict.fromkeys(c for c, _ in pairs))
            vectors = [task_vector(states[c], context.theta_pre) for c in cleans]
            direction = {k: sum(v[k] for v in vectors) / len(vectors) for k in vectors[0]}
        if self.restrict is not None:
            matching_keys(list(self.vectors[0]), self.restrict)  # a pattern matching nothing stops here, before any merge
        self.vector = None if self.project_out == "merged" else injection_vector(
            self.vectors, self.combine, direction, self.restrict, self.topk, self.topk_scope)

    def injection_vector(self, merged: StateDict) -> StateDict:
        """BV_inj for this merge (project_out: merged takes its component along θ_merged − θ_pre out)."""
        if self.vector is not None:
            return self.vector
        if not self.vectors:
            raise RuntimeError("IBVS.apply before prepare: call prepare(context, inputs) first")
        direction = task_vector(merged, self.theta_pre)
        return injection_vector(self.vectors, self.combine, direction, self.restrict, self.topk, self.topk_scope)

    def apply(self, merged: StateDict, strength: float) -> StateDict:
        return ibvs_defend(merged, self.injection_vector(merged), strength)

    def describe(self, strength: float, inputs) -> dict:
        return {**super().describe(strength, inputs), **self.options()}
