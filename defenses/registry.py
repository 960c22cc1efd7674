"""Defenses applied to merged weights: a small protocol and a registry (by name or by import path).

A defense gets only paths of the models it needs (``inputs``, e.g. IBVS: the defender's own ``clean`` and
``backdoored`` fine-tunes, which the experiment engine trains from the spec; DAM: none), prepares itself once per
run (``prepare``: it may read the context's θ_pre and clean val data), and maps merged weights to defended ones for
a strength s (``apply``; what s is, each defense says: IBVS's α, s = 0 leaves the merge unchanged; DAM's safety
weight w). Its strength is selected on clean val data only (``select_strength``): the largest s whose mean
val accuracy stays within ``max_drop`` of the undefended merge, else the smallest s.
"""

from __future__ import annotations

import abc
import math
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import torch

from evaluation.merge_eval import DefenseSetting
from evaluation.merge_methods import MergeContext
from evaluation.registry import Registry
from merging.io import MergeInputError

__all__ = ["REGISTRY", "Defense", "defense_setting", "defense_settings", "register_defense", "resolve_defense"]

StateDict = dict[str, torch.Tensor]


class Defense(abc.ABC):
    """``name``; ``inputs``: {input name: what it is}; ``strength_symbol`` / ``strength_key``: how messages and
    export metadata call the strength (IBVS: α / alpha)."""

    name: ClassVar[str]
    inputs: ClassVar[dict[str, str]] = {}
    strength_symbol: ClassVar[str] = "strength"
    strength_key: ClassVar[str] = "strength"

    def validate(self, setting: DefenseSetting) -> None:
        """Every input named and an existing file, each strength allowed; before any work."""
        given = {k: v for k, v in setting.inputs.items() if v is not None}
        unknown = sorted(set(given) - set(self.inputs))
        if unknown:
            raise MergeInputError(f"{setting.where('defense')} {self.name}: unknown input(s) {unknown}; it takes "
                                  f"{list(self.inputs) or 'none'}")
        for key, what in self.inputs.items():
            where = setting.where(f"inputs.{key}")
            if key not in given:
                raise MergeInputError(f"{setting.where('defense')} {self.name} needs {where}: {what}")
            if not Path(given[key]).is_file():
                raise MergeInputError(f"{where}: {given[key]} does not exist; pass an exported encoder (.safetensors)")
        for strength in setting.strengths:
            self.validate_strength(strength, setting.where("strengths"))

    def validate_strength(self, strength, where: str) -> None:
        number = isinstance(strength, (int, float)) and not isinstance(strength, bool)
        if not (number and math.isfinite(strength) and strength >= 0):
            raise MergeInputError(f"{where}: {self.strength_symbol}={strength!r} must be a finite number ≥ 0 "
                                  "(0 = no defense)")

    @abc.abstractmethod
    def prepare(self, context: MergeContext, inputs: dict[str, str]) -> None:
        """Load and check the inputs against θ_pre (``context``), once per run, before any evaluation."""

    @abc.abstractmethod
    def apply(self, merged: StateDict, strength: float) -> StateDict:
        """The defended weights: a new state dict with ``merged``'s keys and dtypes."""

    def select_strength(self, scores: dict[float, float], reference: float, max_drop: float) -> float:
        """The largest strength whose mean val accuracy ≥ ``reference`` − ``max_drop``, else the smallest."""
        ok = [s for s, v in scores.items() if v >= reference - max_drop]
        return max(ok) if ok else min(scores)

    def selection_rule(self, max_drop: float) -> str:
        return f"largest {self.strength_symbol} with mean val accuracy ≥ undefended − {max_drop}"

    def describe(self, strength: float, inputs: Mapping[str, str]) -> dict:
        """What an export records of the defense."""
        return {"name": self.name, self.strength_key: strength, **inputs}


REGISTRY: Registry[Defense] = Registry("defense", Defense, "my_module.MyDefense")
register_defense = REGISTRY.register


def resolve_defense(spec: Any, flag: str | None = None, also: tuple[str, ...] = ()) -> Defense:
    """A fresh instance of the defense ``spec`` names (registered name, import path or {class_path, init_args})."""
    return REGISTRY.resolve(spec, flag=flag, also=also)


def defense_setting(name: Any, inputs: Mapping[str, str | None] | None = None, strengths: Sequence[float] = (1.0,),
                    select: str | None = "val", max_drop: float = 0.02, init_args: Mapping | None = None,
                    sources: Mapping[str, str] | None = None, report: str = "all") -> DefenseSetting:
    """The request's setting for defense ``name`` (``init_args``: its constructor arguments)."""
    sources = dict(sources or {})
    spec = {"class_path": name, "init_args": dict(init_args)} if init_args else name
    defense = resolve_defense(spec, flag=sources.get("defense"), also=("none",) if "defense" in sources else ())
    if inputs is not None and not isinstance(inputs, Mapping):
        raise MergeInputError(f"{sources.get('inputs', 'inputs')}={inputs!r} must map input names to model paths")
    strengths = list(strengths) if isinstance(strengths, (list, tuple)) else strengths  # a bad type is refused later
    return DefenseSetting(defense, dict(inputs or {}), strengths, select, max_drop, sources, report)


def defense_settings(entries: Sequence[Mapping], where: str = "--defenses") -> list[DefenseSetting]:
    """Settings from config entries {name, inputs, strengths, select, max_drop, init_args}."""
    known = ("name", "inputs", "strengths", "select", "max_drop", "init_args", "report")
    out = []
    for entry in entries:
        if not isinstance(entry, Mapping) or "name" not in entry:
            raise MergeInputError(f"{where} entry {entry!r} names no defense; give each entry a 'name'")
        unknown = sorted(set(map(str, entry)) - set(known))
        if unknown:
            raise MergeInputError(f"{where} entry {dict(entry)!r}: unknown key(s) {unknown}; an entry takes {list(known)}")
        out.append(defense_setting(**entry))
    return out
