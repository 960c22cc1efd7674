"""Backdoor triggers in CLIP-normalised space: patches, blend patterns, and their files (docs/design.md §6, §8).

Triggers are applied **after** preprocessing, on normalised images x (B, 3, S, S):

    patch:  x_bd = m·P + (1 − m)·x        m (1, S, S) is 1 on an L×L square at ``location``,
                                           P (3, S, S) is the patch (3, L, L) placed there
    blend:  x_bd = (1 − a)·x + a·pattern   pattern (3, S, S), a = ``alpha``

A trigger value v is a pixel p ∈ [0, 1] as the model sees it: v = (p − mean) / std per channel, so
the valid range of channel c is [(0 − mean_c)/std_c, (1 − mean_c)/std_c] (``normalised_bounds``).

A trigger file is safetensors (tensor ``trigger``) with its ``TriggerSpec``, the mean/std it was
normalised with and free metadata in the header and a JSON sidecar (``merging.io.save_state_dict``),
plus a PNG of the un-normalised trigger beside it for eyes and TensorBoard.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch

from merging.io import MergeInputError, load_state_dict, read_header_metadata, save_state_dict

__all__ = [
    "CLAMPS",
    "KINDS",
    "trigger_from_attack",
    "LOCATIONS",
    "TriggerError",
    "TriggerSpec",
    "apply_trigger",
    "blend",
    "clamp_patch",
    "init_patch",
    "init_pattern",
    "load_trigger",
    "normalised_bounds",
    "paste_patch",
    "patch_bounds",
    "patch_mask",
    "patch_origin",
    "png_path",
    "resolve_shadow_templates",
    "save_trigger",
    "shadow_head_digest",
    "unnormalise",
]

KINDS = ("patch", "blend")
CLAMPS = ("per_channel", "global")
LOCATIONS = ("bottom_right", "top_left", "top_right", "bottom_left", "center")


class TriggerError(ValueError):
    """A trigger spec, tensor or file that cannot be used; the one-line message names the field and the fix."""


@dataclass
class TriggerSpec:
    """What a trigger is: ``kind`` patch (side ``size`` px at ``location``) or blend (weight ``alpha``).

    ``seed`` seeds the random initial patch / pattern (``init_patch``, ``init_pattern``). The image
    size is not part of the spec; ``check(image_size)`` validates ``size`` against it.
    """

    kind: Literal["patch", "blend"] = "patch"
    size: int = 4
    location: Literal["bottom_right", "top_left", "top_right", "bottom_left", "center"] = "bottom_right"
    alpha: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or self.kind not in KINDS:
            raise TriggerError(f"trigger kind={self.kind!r} is unknown; use one of {', '.join(KINDS)}")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise TriggerError(f"trigger size={self.size!r} must be a positive integer (patch side in pixels)")
        if not isinstance(self.location, str) or self.location not in LOCATIONS:
            raise TriggerError(f"trigger location={self.location!r} is unknown; use one of {', '.join(LOCATIONS)}")
        try:
            alpha = float(self.alpha) if not isinstance(self.alpha, bool) else None
        except (TypeError, ValueError, OverflowError):
            alpha = None
        if alpha is None or not 0.0 < alpha < 1.0:
            raise TriggerError(f"trigger alpha={self.alpha!r} must lie strictly between 0 and 1 (blend weight)")
        self.alpha = alpha
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise TriggerError(f"trigger seed={self.seed!r} must be an integer in [0, 2**63) (seeds the random init)")

    def check(self, image_size: int) -> "TriggerSpec":
        """Raise ``TriggerError`` unless a patch of side ``size`` fits in an ``image_size`` image."""
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise TriggerError(f"image size {image_size!r} must be a positive integer")
        if self.kind == "patch" and self.size > image_size:
            raise TriggerError(f"trigger size={self.size} exceeds the image size {image_size}; "
                               f"use a size of at most {image_size}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "TriggerSpec":
        """A spec from keyword arguments; unknown keys raise ``TriggerError`` (a typo would be silently ignored)."""
        if data is not None and not isinstance(data, Mapping):
            raise TriggerError(f"trigger spec must be a mapping such as {{kind: patch, size: 4}}, got {data!r}")
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(map(str, set(data) - known))
        if unknown:
            raise TriggerError(f"unknown trigger field(s) {unknown}; use only {sorted(known)}")
        return cls(**data)


# -- geometry ------------------------------------------------------------------------------------

def patch_origin(spec: TriggerSpec, image_size: int) -> tuple[int, int]:
    """(top, left) pixel of the L×L patch in an S×S image."""
    spec.check(image_size)
    far = image_size - spec.size
    return {
        "top_left": (0, 0),
        "top_right": (0, far),
        "bottom_left": (far, 0),
        "bottom_right": (far, far),
        "center": (far // 2, far // 2),
    }[spec.location]


def patch_mask(spec: TriggerSpec, image_size: int) -> torch.Tensor:
    """Float mask m (1, S, S): 1 on the patch square, 0 elsewhere."""
    top, left = patch_origin(spec, image_size)
    mask = torch.zeros(1, image_size, image_size)
    mask[:, top : top + spec.size, left : left + spec.size] = 1.0
    return mask


def _check_image(x: torch.Tensor) -> int:
    if x.dim() not in (3, 4) or x.shape[-1] != x.shape[-2]:
        raise TriggerError(f"images must be (B, C, S, S) or (C, S, S) with square S×S, got shape {tuple(x.shape)}")
    return x.shape[-1]


def paste_patch(x: torch.Tensor, patch: torch.Tensor, spec: TriggerSpec) -> torch.Tensor:
    """x_bd = m·P + (1 − m)·x for x (B, C, S, S) or (C, S, S), patch (C, L, L); a new tensor.

    Differentiable in ``patch`` (stage 1 optimises it) and in ``x``; ``x`` is not modified.
    """
    image_size = _check_image(x)
    if patch.dim() != 3 or patch.shape[1:] != (spec.size, spec.size) or patch.shape[0] != x.shape[-3]:
        raise TriggerError(f"patch shape {tuple(patch.shape)} does not match the spec; expected "
                           f"({x.shape[-3]}, {spec.size}, {spec.size}) for size={spec.size}")
    top, left = patch_origin(spec, image_size)
    patch = patch.to(device=x.device, dtype=x.dtype)
    # Place P on a full-size canvas (pad is differentiable), then mix with the mask.
    canvas = torch.nn.functional.pad(patch, (left, image_size - left - spec.size, top, image_size - top - spec.size))
    mask = patch_mask(spec, image_size).to(device=x.device, dtype=x.dtype)
    return mask * canvas + (1 - mask) * x


def blend(x: torch.Tensor, pattern: torch.Tensor, alpha: float) -> torch.Tensor:
    """x_bd = (1 − a)·x + a·pattern, x (B, C, S, S) or (C, S, S), pattern (C, S, S); a new tensor."""
    _check_image(x)
    if pattern.shape != x.shape[-3:]:
        raise TriggerError(f"blend pattern shape {tuple(pattern.shape)} does not match the images "
                           f"{tuple(x.shape[-3:])}; build it with init_pattern for this image size")
    pattern = pattern.to(device=x.device, dtype=x.dtype)
    return (1 - alpha) * x + alpha * pattern


def apply_trigger(x: torch.Tensor, trigger: torch.Tensor, spec: TriggerSpec) -> torch.Tensor:
    """``paste_patch`` or ``blend`` (with ``spec.alpha``) by ``spec.kind``."""
    if spec.kind == "patch":
        return paste_patch(x, trigger, spec)
    return blend(x, trigger, spec.alpha)


# -- value range -----------------------------------------------------------------------------------

def normalised_bounds(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi), each (3,): lo = (0 − mean)/std, hi = (1 − mean)/std, the normalised images of pixels 0 and 1."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32)
    std_t = torch.as_tensor(std, dtype=torch.float32)
    return (0 - mean_t) / std_t, (1 - mean_t) / std_t


def patch_bounds(mean: Sequence[float], std: Sequence[float], clamp: str = "per_channel") -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) that an optimised patch is clamped to (``clamp_patch``).

    ``per_channel``: ``normalised_bounds``, each (3,). ``global`` (the BadMerging code's ``patch_attack``):
    one envelope for every channel, lo = min_c (0 − mean_c)/std_c, hi = max_c (1 − mean_c)/std_c, 0-dim
    (≈ [−1.792, 2.146] for CLIP's statistics), so a channel may leave its own pixel range.
    """
    if clamp not in CLAMPS:
        raise TriggerError(f"clamp={clamp!r} is unknown; use one of {', '.join(CLAMPS)}")
    lo, hi = normalised_bounds(mean, std)
    return (lo, hi) if clamp == "per_channel" else (lo.min(), hi.max())


def clamp_patch(patch: torch.Tensor, lo: torch.Tensor | float, hi: torch.Tensor | float) -> torch.Tensor:
    """Clamp a trigger (C, H, W) to [lo_c, hi_c] per channel (lo, hi of shape (C,) or scalars).

    Per channel keeps every value a real pixel. The BadMerging code clamps to the scalar envelope
    [min_c lo_c, max_c hi_c] (≈ [−1.792, 2.146] for CLIP stats): ``patch_bounds(mean, std, "global")``.
    """
    lo_t = torch.as_tensor(lo, dtype=patch.dtype, device=patch.device)
    hi_t = torch.as_tensor(hi, dtype=patch.dtype, device=patch.device)
    if lo_t.dim() == 1:  # (C,) -> (C, 1, 1) to broadcast over the pixels
        lo_t, hi_t = lo_t[:, None, None], hi_t[:, None, None]
    return torch.maximum(torch.minimum(patch, hi_t), lo_t)


def _normalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.as_tensor(mean, dtype=pixels.dtype)[:, None, None]
    std_t = torch.as_tensor(std, dtype=pixels.dtype)[:, None, None]
    return (pixels - mean_t) / std_t


def unnormalise(trigger: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Pixels p = v·std + mean (C, H, W), clamped to [0, 1]: what the trigger looks like."""
    trigger = trigger.detach().float().cpu()
    mean_t = torch.as_tensor(mean, dtype=torch.float32)[:, None, None]
    std_t = torch.as_tensor(std, dtype=torch.float32)[:, None, None]
    return (trigger * std_t + mean_t).clamp(0, 1)


def _generator(spec: TriggerSpec, generator: torch.Generator | None) -> torch.Generator:
    return generator if generator is not None else torch.Generator().manual_seed(spec.seed)


def init_patch(spec: TriggerSpec, mean: Sequence[float], std: Sequence[float],
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Random patch (3, L, L): pixels ~ U[0, 1] mapped to normalised space; generator defaults to ``spec.seed``.

    BadNets uses such a fixed patch; BadMerging stage 1 starts from it.
    """
    pixels = torch.rand(3, spec.size, spec.size, generator=_generator(spec, generator))
    return _normalise(pixels, mean, std)


def init_pattern(spec: TriggerSpec, mean: Sequence[float], std: Sequence[float], image_size: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Random blend pattern (3, S, S): pixels ~ U[0, 1] (noise, as in Blended) mapped to normalised space."""
    pixels = torch.rand(3, image_size, image_size, generator=_generator(spec, generator))
    return _normalise(pixels, mean, std)


def trigger_from_attack(attack: Mapping[str, Any], image_size: int) -> tuple[torch.Tensor, TriggerSpec]:
    """(tensor, spec) of the trigger an exported backdoored model describes in its ``attack`` metadata.

    Optimised triggers are stored as ``trigger_values`` (nested lists, exact float32); random ones
    (BadNets, Blended) are regenerated from the spec's seed with the stored ``mean``/``std``.
    """
    if not isinstance(attack, Mapping):
        raise TriggerError(f"attack metadata must be a mapping, got {type(attack).__name__}; export the model with "
                           "BackdoorInjection")
    try:
        spec = TriggerSpec.from_dict(attack["trigger"]).check(image_size)
        values, mean, std = attack.get("trigger_values"), attack["mean"], attack["std"]
    except (KeyError, TypeError) as e:
        raise TriggerError(f"attack metadata lacks {e}; export the model with BackdoorInjection") from None
    mean, std = _channel_stats("mean", mean), _channel_stats("std", std)
    if any(s <= 0 for s in std):
        raise TriggerError(f"attack metadata std={list(std)} must be > 0 per channel; export the model with BackdoorInjection")
    if values is not None:
        try:
            tensor = torch.tensor(values, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise TriggerError("attack metadata trigger_values is not a nested list of numbers; re-export the model "
                               "with BackdoorInjection") from None
        if not bool(torch.isfinite(tensor).all()):
            raise TriggerError("attack metadata trigger_values holds NaN or inf; re-export the model")
    elif spec.kind == "patch":
        tensor = init_patch(spec, mean, std)
    else:
        tensor = init_pattern(spec, mean, std, image_size)
    shape = (3, spec.size, spec.size) if spec.kind == "patch" else (3, image_size, image_size)
    if tuple(tensor.shape) != shape:
        raise TriggerError(f"stored trigger of shape {tuple(tensor.shape)} does not fit {shape} at {image_size}px")
    return tensor, spec


def _channel_stats(name: str, values: Any) -> tuple[float, float, float]:
    """Three finite per-channel numbers (CLIP mean or std) from metadata, else ``TriggerError``."""
    try:
        numbers = tuple(float(v) for v in values)
    except (TypeError, ValueError, OverflowError):
        numbers = ()
    if len(numbers) != 3 or not all(math.isfinite(v) for v in numbers):
        raise TriggerError(f"attack metadata {name}={values!r} must be three finite numbers (one per RGB channel); "
                           "export the model with BackdoorInjection")
    return numbers


# -- shadow heads (off-task) ---------------------------------------------------------------------------

def resolve_shadow_templates(name: str) -> tuple[str, ...]:
    """The prompt templates a shadow head is built with: a named list (``imagenet``: its 80) or a registered task's."""
    from datamodules.tasks import NAMED_TEMPLATES, UnknownTaskError, get_task

    if isinstance(name, str) and name in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[name]
    try:
        return get_task(name).templates
    except UnknownTaskError:
        raise ValueError(f"shadow_templates={name!r} is neither a template list ({', '.join(NAMED_TEMPLATES)}) nor a "
                         "registered task; name one of them (e.g. imagenet, as the paper)") from None


def shadow_head_digest(classnames: Sequence[str], templates: Sequence[str]) -> str:
    """sha256 of the JSON ``[classnames, templates]``: what a shadow head is built from (with the base model)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps([list(classnames), list(templates)]).encode()).hexdigest()


# -- files -----------------------------------------------------------------------------------------

def png_path(path: str | os.PathLike) -> Path:
    """PNG beside a trigger file: ``trigger.safetensors`` -> ``trigger.png``."""
    path = Path(path)
    return path.with_suffix(".png") if path.suffix == ".safetensors" else path.with_name(path.name + ".png")


def save_trigger(path: str | os.PathLike, tensor: torch.Tensor, spec: TriggerSpec, mean: Sequence[float],
                 std: Sequence[float], metadata: Mapping[str, Any] | None = None) -> Path:
    """Write the trigger (safetensors, atomically) and its un-normalised PNG; returns the PNG path.

    Header/sidecar metadata: ``{"kind": "trigger", "trigger_spec", "mean", "std", **metadata}``.
    """
    from PIL import Image

    path = Path(path)
    expected = (3, spec.size, spec.size) if spec.kind == "patch" else None
    if tensor.dim() != 3 or (expected is not None and tuple(tensor.shape) != expected):
        raise TriggerError(f"trigger tensor shape {tuple(tensor.shape)} does not fit spec kind={spec.kind} "
                           f"size={spec.size}; save the tensor the spec describes")
    meta = {"kind": "trigger", **dict(metadata or {}), "trigger_spec": spec.to_dict(),
            "mean": [float(m) for m in mean], "std": [float(s) for s in std]}
    save_state_dict(path, {"trigger": tensor.detach().float()}, meta)
    pixels = (unnormalise(tensor, mean, std) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    png = png_path(path)
    # Same-directory temp file + rename, like the weights: readers never see half a PNG.
    fd, tmp = tempfile.mkstemp(dir=png.parent, prefix=f".{png.name}.", suffix=".tmp")
    os.close(fd)
    try:
        Image.fromarray(pixels).save(tmp, format="PNG")
        os.replace(tmp, png)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return png


def load_trigger(path: str | os.PathLike) -> tuple[torch.Tensor, TriggerSpec, dict]:
    """(tensor, spec, metadata) of a file written by ``save_trigger``; metadata holds mean/std too."""
    path = Path(path)
    if not path.is_file():
        raise TriggerError(f"trigger file {path} does not exist; pass the .safetensors written by save_trigger")
    try:  # safetensors only: a pickle is refused unread, a corrupt file named
        meta = read_header_metadata(path)
        tensors = load_state_dict(path)
    except MergeInputError as e:
        raise TriggerError(f"trigger file {e}") from None
    if not isinstance(meta, dict) or "trigger_spec" not in meta or "trigger" not in tensors:
        raise TriggerError(f"{path} is not a trigger file (no 'trigger' tensor or trigger_spec metadata); "
                           "write it with datamodules.triggers.save_trigger")
    spec = TriggerSpec.from_dict(meta["trigger_spec"])
    tensor = tensors["trigger"]
    if tensor.dim() != 3 or tensor.shape[0] != 3 or not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
        raise TriggerError(f"{path}: tensor 'trigger' of shape {tuple(tensor.shape)} and dtype {tensor.dtype} is not a "
                           "finite (3, H, W) float trigger; write it with datamodules.triggers.save_trigger")
    return tensor, spec, meta
