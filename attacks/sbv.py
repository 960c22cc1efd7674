"""Sparse Backdoor Vectors (docs/design.md §10): a vector attack built from one clean reference and n backdoored runs.

    BV_i   = θ_bd,i − θ_clean                           float tensors of the image encoder
    SBV    = top-k%(combine(BV_1 … BV_n))               combine: sum | mean | elect (TIES sign election)
    SBV_SC = the same, keeping only entries where all BV_i agree in sign before combining
    θ_submit = θ_clean + scale·SBV

Registered as ``sbv`` and ``sbv_sc`` (= ``sbv`` with ``sign_consistent=True``). The export carries the
metadata of the variant named by ``trigger_from`` (its trigger is the one the SBV is measured with), its
``attack.name`` replaced by the output's name, plus an ``attack.sbv`` record of how it was built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from attacks.base import AttackError, VectorAttack
from attacks.registry import register_attack
from merging.backdoor_vectors import COMBINE_METHODS, backdoor_vector, inject, sparse_backdoor_vector
from merging.io import load_metadata, load_state_dict, save_state_dict
from modeling.version import code_version

__all__ = ["SETTINGS", "SparseBackdoorVector", "build_sbv", "check_sbv_output", "check_settings"]

SETTINGS = ("combine", "k", "sign_consistent", "scale", "scope")


@register_attack("sbv_sc", sign_consistent=True)
@register_attack("sbv")
class SparseBackdoorVector(VectorAttack):
    """SBV / SBV_SC with its settings: ``k`` percent of entries kept (per tensor, or of the whole vector with
    ``scope="global"``), ``scale`` the injection weight λ."""

    def __init__(self, combine: str = "sum", k: float = 100.0, sign_consistent: bool = False, scale: float = 1.0,
                 scope: str = "tensor"):
        check_settings("sbv", combine, k, sign_consistent, scale, scope)
        self.combine, self.k, self.sign_consistent, self.scale, self.scope = combine, k, sign_consistent, scale, scope

    def settings(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in SETTINGS}

    def build(self, clean_path: str, variant_paths: Mapping[str, str], trigger_from: str, path: str | Path,
              name: str | None = None) -> Path:
        """Export θ_clean + scale·SBV of the variants' BVs to ``path`` (safetensors + JSON sidecar)."""
        name = name or self.name or "sbv"
        if trigger_from not in variant_paths:
            raise AttackError(f"trigger_from={trigger_from!r} is not a variant; use one of {list(variant_paths)}")
        clean = load_state_dict(clean_path)
        bvs = [backdoor_vector(load_state_dict(p), clean) for p in variant_paths.values()]
        sbv = sparse_backdoor_vector(bvs, self.combine, self.k, self.sign_consistent, self.scope)
        state = inject(clean, sbv, self.scale)
        meta = dict(load_metadata(variant_paths[trigger_from]) or {})
        if not isinstance(meta.get("attack"), dict):
            raise AttackError(f"{variant_paths[trigger_from]} (trigger_from={trigger_from}) has no attack metadata; "
                              "it must be a BackdoorInjection export")
        nonzero = sum(int((v != 0).sum()) for v in sbv.values())
        total = sum(v.numel() for v in sbv.values())
        record = {**self.settings(), "variants": dict(variant_paths), "clean_reference": clean_path,
                  "trigger_from": trigger_from, "nonzero_fraction": nonzero / total}
        meta["attack"] = {**meta["attack"], "name": name, "sbv": record}
        meta.update(kind="sbv", code_version=code_version())
        path = Path(path)
        save_state_dict(path, state, meta)
        print(f"[bv] {name}: {len(bvs)} BVs, combine={self.combine}, k={self.k}%, sign_consistent={self.sign_consistent}, "
              f"scale={self.scale}, non-zero {100 * nonzero / total:.1f}% -> {path}", flush=True)
        return path


def check_settings(where: str, combine: Any, k: Any, sign_consistent: Any, scale: Any, scope: Any) -> None:
    """Refuse settings the builder cannot use: one line ``<where>: <setting>=<value> ...; <fix>``."""
    if combine not in COMBINE_METHODS:
        raise AttackError(f"{where}: combine={combine!r} is unknown; use one of {', '.join(COMBINE_METHODS)}")
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 100:
        raise AttackError(f"{where}: k={k!r} must be in (0, 100] (percent of entries kept)")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale == scale or abs(scale) == float("inf"):
        raise AttackError(f"{where}: scale={scale!r} must be a finite number")
    if not isinstance(sign_consistent, bool):
        raise AttackError(f"{where}: sign_consistent={sign_consistent!r} must be true or false")
    if scope not in ("tensor", "global"):
        raise AttackError(f"{where}: scope={scope!r} is unknown; use tensor (top-k per tensor) or global")


def check_sbv_output(entry: Mapping[str, Any]) -> dict[str, Any]:
    """An ``outputs`` entry of bv.py (``{name, combine, k, sign_consistent, scale, scope}``) with defaults filled."""
    if not isinstance(entry, Mapping) or not entry.get("name"):
        raise AttackError(f"outputs entry {entry!r} has no name; give each SBV a name such as sbv or sbv_sc")
    unknown = sorted(set(entry) - {"name", *SETTINGS})
    if unknown:
        raise AttackError(f"outputs {entry['name']}: unknown key(s) {unknown}; use {sorted({'name', *SETTINGS})}")
    settings = {"combine": "sum", "k": 100.0, "sign_consistent": False, "scale": 1.0, "scope": "tensor",
                **{k: v for k, v in entry.items() if k != "name"}}
    check_settings(f"outputs {entry['name']}", *(settings[k] for k in SETTINGS))
    return {"name": entry["name"], **settings}


def build_sbv(clean_path: str, variant_paths: Mapping[str, str], output: Mapping[str, Any], trigger_from: str,
              path: str | Path) -> Path:
    """bv.py's builder as a library call: ``output`` = ``{name, combine, k, sign_consistent, scale, scope}``
    (missing settings take SBV's defaults); writes ``path`` and returns it."""
    settings = check_sbv_output(output)
    return SparseBackdoorVector(**{k: settings[k] for k in SETTINGS}).build(clean_path, variant_paths, trigger_from, path,
                                                                            name=settings["name"])
