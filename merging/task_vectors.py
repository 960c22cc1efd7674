"""Task vectors: tau_t = theta_t - theta_pre over the floating-point tensors of a state dict."""

from __future__ import annotations

import math
from typing import Mapping

import torch

from .io import MergeInputError

__all__ = ["add_vector", "compute_dtype", "is_mergeable", "narrowest_float", "not_finite_in", "task_vector"]


def is_mergeable(tensor: torch.Tensor) -> bool:
    """Floating-point tensors are merged; integer / uint8 / bool buffers are copied from theta_pre."""
    return tensor.is_floating_point()


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Arithmetic dtype for task vectors: at least float32 (fp16/bf16 differences lose digits)."""
    result = torch.float32
    for dtype in dtypes:
        if dtype.is_floating_point and dtype.itemsize == 1:
            continue  # float8 formats do not promote; their differences are computed in float32
        result = torch.promote_types(result, dtype)
    return result


def not_finite_in(value: float, dtype: torch.dtype) -> str | None:
    """Why the number ``value`` is not finite in ``dtype`` (a phrase for messages), or None when it is.

    A float64 number beyond ``torch.finfo(dtype).max`` becomes ±inf in ``dtype``: 1e39 is finite as float64 but inf
    as float32 (max 3.4e38), 1e5 is inf as float16 (max 65504), so every weight it scales turns inf or NaN.
    """
    try:
        number = float(value)
    except OverflowError:  # an int beyond float64
        return "is not finite"
    if not math.isfinite(number):
        return "is not finite"
    largest = float(torch.finfo(dtype).max)
    if abs(number) > largest:
        return f"is not finite in {str(dtype).removeprefix('torch.')} (|value| must be ≤ {largest:.4g} there)"
    return None


def narrowest_float(dtypes) -> torch.dtype:
    """The float dtype of ``dtypes`` with the smallest largest-finite value (float32 when there is none)."""
    floats = [d for d in dtypes if d.is_floating_point]
    return min(floats, key=lambda d: float(torch.finfo(d).max), default=torch.float32)


def task_vector(finetuned: Mapping[str, torch.Tensor], pretrained: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """tau = finetuned - pretrained on every float key of ``pretrained``; shapes [*] per key.

    Computed in ``compute_dtype`` (float32 or float64). Both state dicts must have the same keys and
    shapes; a mismatch raises MergeInputError naming the key (a wrong checkpoint is a common mistake).
    """
    missing = sorted(set(pretrained) - set(finetuned))
    if missing:
        raise MergeInputError(f"fine-tuned state dict lacks key {missing[0]!r} of the pre-trained one; "
                              "was it fine-tuned from this base model?")
    extra = sorted(set(finetuned) - set(pretrained))
    if extra:
        raise MergeInputError(f"fine-tuned state dict has key {extra[0]!r} absent from the pre-trained one; "
                              "pass the image-encoder state dict of the same architecture")
    vector = {}
    for key, base in pretrained.items():
        tuned = finetuned[key]
        if tuple(tuned.shape) != tuple(base.shape):
            raise MergeInputError(f"key {key!r}: fine-tuned shape {tuple(tuned.shape)} != pre-trained shape "
                                  f"{tuple(base.shape)}; check the architecture")
        if not is_mergeable(base):
            continue
        if not is_mergeable(tuned):
            raise MergeInputError(f"key {key!r}: fine-tuned tensor is {tuned.dtype}, pre-trained is {base.dtype}; "
                                  "both must be floating point")
        dtype = compute_dtype(base.dtype, tuned.dtype)
        vector[key] = tuned.to(dtype) - base.to(dtype)
    return vector


def add_vector(
    base: Mapping[str, torch.Tensor], vector: Mapping[str, torch.Tensor], coefficient: float = 1.0
) -> dict[str, torch.Tensor]:
    """base + coefficient * vector on the vector's keys (result in base's dtype); other keys copied."""
    result = {}
    for key, tensor in base.items():
        if key not in vector:
            result[key] = tensor.clone()
            continue
        delta = vector[key]
        if tuple(delta.shape) != tuple(tensor.shape):
            raise MergeInputError(f"key {key!r}: vector shape {tuple(delta.shape)} != base shape "
                                  f"{tuple(tensor.shape)}; the vector belongs to another architecture")
        if not is_mergeable(tensor):
            raise MergeInputError(f"key {key!r}: base tensor is {tensor.dtype}; vectors apply to float tensors only")
        dtype = compute_dtype(tensor.dtype, delta.dtype)
        result[key] = (tensor.to(dtype) + coefficient * delta.to(dtype)).to(tensor.dtype)
    unknown = sorted(set(vector) - set(base))
    if unknown:
        raise MergeInputError(f"vector key {unknown[0]!r} is not in the base state dict; check the architecture")
    return result
