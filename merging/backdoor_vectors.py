"""Backdoor Vectors (docs/design.md §10): BVs, their similarity, Sparse Backdoor Vectors and the IBVS defense.

All functions are plain tensor math on state dicts (``{key: tensor}``, the image encoder's float
tensors), free of Lightning.

    BV        = θ_bd − θ_clean                                   (paired runs: same seed, data order)
    cos(a, b) = ⟨a, b⟩ / (‖a‖·‖b‖)                               whole model, or per block
    SBV       = sparsify_k( combine(BV_1 … BV_n) )               combine: sum | mean | elect (TIES signs)
    SBV_SC    = combine(BV_i) ⊙ [all BV_i agree in sign]          optionally sparsified too
    θ_submit  = θ_clean + λ·SBV
    IBVS      θ_defended = θ_merged − α·BV_inj,  BV_inj = θ_defender_bd − θ_defender_clean
    BV_inj    = topk_k( restrict_P( project_u( combine(BV_1 … BV_K) ) ) )    (injection_vector; each step optional)
    project_u(v)_t = v_t − (⟨v_t, u_t⟩ / ⟨u_t, u_t⟩)·u_t                       per tensor t (v_t where u_t = 0)
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase
from typing import Literal, Mapping, Sequence

import torch

from .io import MergeInputError
from .task_vectors import add_vector, task_vector

__all__ = [
    "COMBINE_METHODS", "backdoor_vector", "block_of", "combine_vectors", "cosine_similarity",
    "ibvs_defend", "inject", "injection_vector", "matching_keys", "project_out", "sign_consistent_mask",
    "similarity_matrix", "sparse_backdoor_vector", "sparsify_top_k",
]

StateDict = Mapping[str, torch.Tensor]
COMBINE_METHODS = ("sum", "mean", "elect")


def backdoor_vector(backdoored: StateDict, clean: StateDict) -> dict[str, torch.Tensor]:
    """BV = θ_bd − θ_clean on every float key (float32 at least); same keys and shapes required."""
    return task_vector(backdoored, clean)


def inject(clean: StateDict, vector: StateDict, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """θ_clean + scale·vector (θ_submit for an SBV, θ_clean^B + λ·BV_A for a transfer cell)."""
    return add_vector(clean, vector, scale)


def ibvs_defend(merged: StateDict, bv_inj: StateDict, alpha: float) -> dict[str, torch.Tensor]:
    """IBVS: θ_merged − α·BV_inj; α = 0 returns the merged weights unchanged."""
    if not (alpha == alpha and abs(alpha) != float("inf")):
        raise MergeInputError(f"IBVS alpha={alpha} must be a finite number (0 = no defense)")
    return add_vector(merged, bv_inj, -float(alpha))


_BLOCK_PATTERNS = (re.compile(r"^(.*?resblocks\.\d+)\."), re.compile(r"^(.*?layers?\.\d+)\."),
                   re.compile(r"^(.*?blocks?\.\d+)\."))


def block_of(key: str) -> str:
    """The block a tensor belongs to: ``…resblocks.<i>`` for transformer layers, else the key's module
    (``visual.conv1.weight`` → ``visual.conv1``), so embeddings and the final norm/projection stay apart."""
    for pattern in _BLOCK_PATTERNS:
        match = pattern.match(key)
        if match:
            return match.group(1)
    return key.rsplit(".", 1)[0] if "." in key else key


def _check_same_keys(vectors: Sequence[StateDict], names: Sequence[str] | None = None) -> list[str]:
    if not vectors:
        raise MergeInputError("no backdoor vectors given; pass at least one")
    keys = list(vectors[0])
    for i, vector in enumerate(vectors[1:], 1):
        if set(vector) != set(keys):
            name = names[i] if names else f"vector {i}"
            odd = sorted(set(vector) ^ set(keys))[0]
            raise MergeInputError(f"{name}: key {odd!r} is not shared by all vectors; use BVs of the same architecture")
        for key in keys:
            if vector[key].shape != vectors[0][key].shape:
                name = names[i] if names else f"vector {i}"
                raise MergeInputError(f"{name}: key {key!r} has shape {tuple(vector[key].shape)}, "
                                      f"expected {tuple(vectors[0][key].shape)}")
    return keys


def cosine_similarity(a: StateDict, b: StateDict, per_block: bool = False):
    """cos(a, b) over all shared float keys flattened into one vector, or a dict {block: cos} per block.

    A zero vector has similarity 0 with everything (not NaN).
    """
    keys = _check_same_keys([a, b])
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(block_of(key) if per_block else "all", []).append(key)
    result = {}
    for group, members in groups.items():
        dot = na = nb = torch.zeros((), dtype=torch.float64)
        for key in members:
            x, y = a[key].double().flatten(), b[key].double().flatten()
            dot = dot + x @ y
            na, nb = na + x @ x, nb + y @ y
        denom = (na.sqrt() * nb.sqrt()).item()
        result[group] = dot.item() / denom if denom > 0 else 0.0
    return result if per_block else result["all"]


def similarity_matrix(vectors: Sequence[StateDict], per_block: bool = False):
    """(n, n) cosine matrix; with ``per_block`` a dict {block: (n, n) matrix}. Entries are float64."""
    n = len(vectors)
    _check_same_keys(vectors)
    if not per_block:
        matrix = torch.eye(n, dtype=torch.float64)
        for i in range(n):
            for j in range(i + 1, n):
                matrix[i, j] = matrix[j, i] = cosine_similarity(vectors[i], vectors[j])
            if all(float(t.abs().max()) == 0 for t in vectors[i].values()):
                matrix[i, i] = 0.0
        return matrix
    blocks: dict[str, torch.Tensor] = {}
    for i in range(n):
        for j in range(i, n):
            for block, value in cosine_similarity(vectors[i], vectors[j], per_block=True).items():
                matrix = blocks.setdefault(block, torch.zeros(n, n, dtype=torch.float64))
                matrix[i, j] = matrix[j, i] = value
    return blocks


def combine_vectors(vectors: Sequence[StateDict], method: Literal["sum", "mean", "elect"] = "sum") -> dict[str, torch.Tensor]:
    """Combine n BVs entry-wise: ``sum`` Σ v_i; ``mean`` Σ v_i / n; ``elect`` TIES-style sign election:
    s = sign(Σ v_i), then the mean of the entries v_i with sign(v_i) = s (0 where none agrees)."""
    if method not in COMBINE_METHODS:
        raise MergeInputError(f"combine method {method!r} is unknown; use one of {', '.join(COMBINE_METHODS)}")
    keys = _check_same_keys(vectors)
    out = {}
    for key in keys:
        stack = torch.stack([v[key].float() if v[key].dtype.itemsize < 4 else v[key] for v in vectors])
        if method == "sum":
            out[key] = stack.sum(0)
        elif method == "mean":
            out[key] = stack.mean(0)
        else:
            elected = torch.sign(stack.sum(0))
            agree = (torch.sign(stack) == elected) & (elected != 0)
            count = agree.sum(0)
            out[key] = torch.where(count > 0, (stack * agree).sum(0) / count.clamp(min=1), torch.zeros_like(stack[0]))
    return out


def sparsify_top_k(vector: StateDict, k: float, scope: Literal["tensor", "global"] = "tensor") -> dict[str, torch.Tensor]:
    """Keep the top-k% entries by magnitude, zero the rest: exactly round(k/100·n) entries per tensor
    (``scope="tensor"``) or of the whole vector (``"global"``); ties broken by index order. k in (0, 100]."""
    if not (isinstance(k, (int, float)) and 0 < k <= 100):
        raise MergeInputError(f"top-k percentage k={k!r} must be in (0, 100]; e.g. 10 keeps the largest 10%")
    if scope not in ("tensor", "global"):
        raise MergeInputError(f"sparsify scope {scope!r} is unknown; use tensor or global")
    if k == 100:
        return {key: t.clone() for key, t in vector.items()}
    out = {}
    if scope == "tensor":
        for key, tensor in vector.items():
            flat = tensor.flatten()
            keep = round(k / 100 * flat.numel())
            mask = torch.zeros_like(flat, dtype=torch.bool)
            if keep:
                mask[torch.topk(flat.abs(), keep, sorted=False).indices] = True
            out[key] = (flat * mask).view_as(tensor)
        return out
    keys = list(vector)
    flat = torch.cat([vector[key].flatten().float() for key in keys])
    keep = round(k / 100 * flat.numel())
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if keep:
        mask[torch.topk(flat.abs(), keep, sorted=False).indices] = True
    start = 0
    for key in keys:
        tensor = vector[key]
        n = tensor.numel()
        out[key] = tensor * mask[start:start + n].view_as(tensor)
        start += n
    return out


def sign_consistent_mask(vectors: Sequence[StateDict]) -> dict[str, torch.Tensor]:
    """Boolean mask per key: True where every vector is non-zero with the same sign."""
    keys = _check_same_keys(vectors)
    masks = {}
    for key in keys:
        signs = torch.stack([torch.sign(v[key]) for v in vectors])
        masks[key] = (signs[0] != 0) & (signs == signs[0]).all(0)
    return masks


def sparse_backdoor_vector(vectors: Sequence[StateDict], combine: str = "sum", k: float = 100.0,
                           sign_consistent: bool = False, scope: str = "tensor") -> dict[str, torch.Tensor]:
    """SBV = top-k%(combine(BV_1 … BV_n)); with ``sign_consistent`` (SBV_SC) entries where the BVs
    disagree in sign are zeroed before the top-k selection."""
    combined = combine_vectors(vectors, combine)
    if sign_consistent:
        masks = sign_consistent_mask(vectors)
        combined = {key: value * masks[key] for key, value in combined.items()}
    return sparsify_top_k(combined, k, scope) if k < 100 else combined


def project_out(vector: StateDict, direction: StateDict) -> dict[str, torch.Tensor]:
    """Per tensor t: v_t − (⟨v_t, u_t⟩ / ⟨u_t, u_t⟩)·u_t, so every tensor of the result is orthogonal to u_t;
    v_t unchanged where u_t = 0. Same keys and shapes required; dot products in float64."""
    keys = _check_same_keys([vector, direction], ["vector", "direction"])
    out = {}
    for key in keys:
        v, u = vector[key], direction[key]
        vd, ud = v.double(), u.double()
        uu = float((ud * ud).sum())
        out[key] = v.clone() if uu == 0 else (vd - float((vd * ud).sum()) / uu * ud).to(v.dtype)
    return out


def matching_keys(keys: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """The keys whose name or block (``block_of``) matches one of the glob ``patterns``; every pattern must match
    one key (a typo would silently restrict nothing)."""
    keys = list(keys)
    for pattern in patterns:
        if not any(fnmatchcase(k, pattern) or fnmatchcase(block_of(k), pattern) for k in keys):
            blocks = ", ".join(dict.fromkeys(block_of(k) for k in keys))
            raise MergeInputError(f"restrict pattern {pattern!r} matches no key or block of the encoder; use glob "
                                  f"patterns of keys ('*.mlp.*') or blocks ({blocks})")
    return [k for k in keys if any(fnmatchcase(k, p) or fnmatchcase(block_of(k), p) for p in patterns)]


def injection_vector(vectors: Sequence[StateDict], combine: str = "mean", direction: StateDict | None = None,
                     restrict: Sequence[str] | None = None, topk: float | None = None,
                     scope: Literal["tensor", "global"] = "tensor") -> dict[str, torch.Tensor]:
    """IBVS's BV_inj from the defender's BVs: ``combine`` them (sum | mean | elect; sum over K = mean at K× the
    strength), remove per tensor the component along ``direction`` (``project_out``), keep only the keys of
    ``restrict`` (``matching_keys``; zero elsewhere), then the top-``topk``% entries by magnitude among the kept
    keys (per tensor, or of all kept keys together: ``scope``). Each step is skipped when its argument is None."""
    vector = combine_vectors(vectors, combine)
    if direction is not None:
        vector = project_out(vector, direction)
    kept = list(vector)
    if restrict is not None:
        kept = matching_keys(kept, restrict)
    if topk is not None:
        sparse = sparsify_top_k({k: vector[k] for k in kept}, topk, scope)
    else:
        sparse = {k: vector[k] for k in kept}
    return {k: sparse[k] if k in sparse else torch.zeros_like(v) for k, v in vector.items()}
