"""Trigger pasting, blending, clamping, and trigger files (datamodules/triggers.py)."""

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.triggers import (
    TriggerError,
    TriggerSpec,
    apply_trigger,
    blend,
    clamp_patch,
    init_patch,
    init_pattern,
    load_trigger,
    normalised_bounds,
    paste_patch,
    patch_mask,
    png_path,
    save_trigger,
    unnormalise,
)

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.mark.parametrize(
    "location, rows, cols",
    [("bottom_right", (5, 8), (5, 8)), ("top_left", (0, 3), (0, 3)), ("top_right", (0, 3), (5, 8)),
     ("bottom_left", (5, 8), (0, 3)), ("center", (2, 5), (2, 5))],
)
def test_patch_mask_location(location, rows, cols):
    mask = patch_mask(TriggerSpec(size=3, location=location), 8)
    expected = torch.zeros(1, 8, 8)
    expected[:, rows[0] : rows[1], cols[0] : cols[1]] = 1
    assert mask.shape == (1, 8, 8) and torch.equal(mask, expected)


def test_paste_patch_replaces_only_the_patch_and_copies():
    spec = TriggerSpec(size=2, location="bottom_right")
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    before = x.clone()
    patch = torch.arange(12, dtype=torch.float32).view(3, 2, 2)
    x_bd = paste_patch(x, patch, spec)
    assert torch.equal(x, before)  # not in place
    assert torch.equal(x_bd[:, :, 4:, 4:], patch.expand(4, 3, 2, 2))
    outside = torch.ones(6, 6, dtype=torch.bool)
    outside[4:, 4:] = False
    assert torch.equal(x_bd[:, :, outside], x[:, :, outside])  # non-trigger pixels unchanged, exactly


def test_paste_patch_is_differentiable_in_the_patch():
    spec = TriggerSpec(size=2, location="top_left")
    patch = torch.zeros(3, 2, 2, requires_grad=True)
    paste_patch(torch.zeros(2, 3, 5, 5), patch, spec).sum().backward()
    assert torch.equal(patch.grad, torch.full((3, 2, 2), 2.0))  # two images, each pixel once


def test_blend_and_dispatch():
    x = torch.full((2, 3, 4, 4), 1.0)
    pattern = torch.full((3, 4, 4), 3.0)
    out = blend(x, pattern, 0.25)
    assert torch.allclose(out, torch.full_like(x, 0.75 * 1.0 + 0.25 * 3.0))
    spec = TriggerSpec(kind="blend", alpha=0.25)
    assert torch.equal(apply_trigger(x, pattern, spec), out)
    patch_spec = TriggerSpec(size=2)
    assert torch.equal(apply_trigger(x, torch.zeros(3, 2, 2), patch_spec), paste_patch(x, torch.zeros(3, 2, 2), patch_spec))


def test_normalised_bounds_and_clamp_per_channel():
    lo, hi = normalised_bounds(MEAN, STD)
    assert lo.shape == hi.shape == (3,)
    assert torch.allclose(lo, torch.tensor([-0.48145466 / 0.26862954, -0.4578275 / 0.26130258, -0.40821073 / 0.27577711]))
    assert torch.allclose(hi, torch.tensor([0.51854534 / 0.26862954, 0.5421725 / 0.26130258, 0.59178927 / 0.27577711]))
    assert abs(lo.min().item() + 1.792) < 1e-3 and abs(hi.max().item() - 2.146) < 1e-3  # docs/design.md §8's envelope
    patch = torch.tensor([-10.0, 0.0, 10.0]).view(1, 3, 1).expand(3, 3, 2).clone()  # per channel: low, mid, high
    clamped = clamp_patch(patch, lo, hi)
    for c in range(3):
        assert torch.allclose(clamped[c, 0], lo[c]) and clamped[c, 1].eq(0).all() and torch.allclose(clamped[c, 2], hi[c])
    scalar = clamp_patch(patch, lo.min(), hi.max())
    assert torch.allclose(scalar[:, 0], lo.min().expand(3, 2)) and torch.allclose(scalar[:, 2], hi.max().expand(3, 2))


def test_init_patch_is_seeded_and_in_bounds():
    spec = TriggerSpec(size=4, seed=7)
    a, b = init_patch(spec, MEAN, STD), init_patch(spec, MEAN, STD)
    assert a.shape == (3, 4, 4) and torch.equal(a, b)
    assert not torch.equal(a, init_patch(TriggerSpec(size=4, seed=8), MEAN, STD))
    lo, hi = normalised_bounds(MEAN, STD)
    assert torch.equal(clamp_patch(a, lo, hi), a)
    pattern = init_pattern(TriggerSpec(kind="blend"), MEAN, STD, image_size=6)
    assert pattern.shape == (3, 6, 6) and torch.equal(clamp_patch(pattern, lo, hi), pattern)


def test_save_load_round_trip_and_png(tmp_path):
    spec = TriggerSpec(size=3, location="top_right", seed=3)
    patch = init_patch(spec, MEAN, STD)
    path = tmp_path / "ut" / "trigger.safetensors"
    png = save_trigger(path, patch, spec, MEAN, STD, metadata={"task": "shapes", "target_class": 1})
    assert png == png_path(path) == tmp_path / "ut" / "trigger.png" and png.exists()
    tensor, loaded_spec, meta = load_trigger(path)
    assert torch.equal(tensor, patch) and loaded_spec == spec
    assert meta["task"] == "shapes" and meta["target_class"] == 1 and meta["kind"] == "trigger"
    assert meta["mean"] == list(MEAN) and meta["std"] == list(STD)
    pixels = np.asarray(Image.open(png))
    assert pixels.shape == (3, 3, 3)
    expected = (unnormalise(patch, MEAN, STD) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(pixels, expected)
    assert not list(path.parent.glob("*.tmp"))  # atomic writes leave no temp files


@pytest.mark.parametrize(
    "kwargs, field",
    [({"kind": "noise"}, "kind="), ({"size": 0}, "size="), ({"location": "middle"}, "location="),
     ({"alpha": 1.0}, "alpha="), ({"alpha": 0.0}, "alpha=")],
)
def test_spec_errors_name_the_field(kwargs, field):
    with pytest.raises(TriggerError) as info:
        TriggerSpec(**kwargs)
    message = str(info.value)
    assert field in message and "\n" not in message
    assert isinstance(info.value, ValueError)


def test_size_larger_than_image_and_bad_inputs():
    with pytest.raises(TriggerError, match=r"size=9 exceeds the image size 8; use a size of at most 8"):
        patch_mask(TriggerSpec(size=9), 8)
    with pytest.raises(TriggerError, match="patch shape"):
        paste_patch(torch.zeros(1, 3, 8, 8), torch.zeros(3, 3, 3), TriggerSpec(size=2))
    with pytest.raises(TriggerError, match="unknown trigger field"):
        TriggerSpec.from_dict({"sise": 3})
    with pytest.raises(TriggerError, match="does not exist"):
        load_trigger("/nonexistent/trigger.safetensors")
    assert TriggerSpec(size=5).to_dict() == {"kind": "patch", "size": 5, "location": "bottom_right", "alpha": 0.2, "seed": 0}
