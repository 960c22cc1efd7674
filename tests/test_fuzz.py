"""Property-based fuzzing (hypothesis): random shapes, dtypes, NaNs and key sets thrown at the merge input
validation, random hyperparameters at merge.py's checks, random bytes at the safetensors reader, and random
trigger specs / attack metadata at the trigger code. Nothing may fail with anything but the typed error
(MergeInputError / TriggerError), and whatever passes validation must really be valid."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from datamodules.triggers import TriggerError, TriggerSpec, apply_trigger, init_patch, init_pattern, trigger_from_attack
from merging.io import MergeInputError, SafetensorsReader, load_state_dict, save_state_dict
from merging.streaming import validate_inputs
from merging.task_vectors import task_vector

# BADMERGING_FUZZ_EXAMPLES=2000 searches harder (the suite's default keeps the file near 15 s on 2 cores)
FUZZ = settings(max_examples=int(os.environ.get("BADMERGING_FUZZ_EXAMPLES", 60)), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool]
if hasattr(torch, "float8_e4m3fn"):
    DTYPES.append(torch.float8_e4m3fn)
KEYS = ["conv1.weight", "ln_pre.bias", "proj", "class_embedding", "transformer.resblocks.0.attn.in_proj_weight", "steps"]
SPECIAL = [float("nan"), float("inf"), float("-inf")]


def _tensor(draw, shape, dtype) -> torch.Tensor:
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if not dtype.is_floating_point:
        return torch.randint(0, 100, shape, generator=gen).to(dtype)
    t = torch.randn(shape, generator=gen).clamp(-4, 4).to(dtype)
    if t.numel() and draw(st.booleans()) and draw(st.integers(0, 4)) == 0:
        flat = t.view(-1) if t.is_contiguous() else t.reshape(-1)
        flat[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from(SPECIAL))
        t = flat.view(shape)
    return t


@st.composite
def state_dicts(draw, min_keys: int = 1):
    keys = draw(st.lists(st.sampled_from(KEYS), min_size=min_keys, max_size=len(KEYS), unique=True))
    out = {}
    for key in keys:
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        out[key] = _tensor(draw, shape, draw(st.sampled_from(DTYPES)))
    return out


def _mutate(draw, pre: dict) -> dict:
    """A model derived from ``pre``: usually close to it, sometimes broken in one or more ways."""
    model = {k: v.clone() for k, v in pre.items()}
    for _ in range(draw(st.integers(0, 2))):
        action = draw(st.sampled_from(["noise", "drop", "add", "reshape", "dtype", "nan", "same"]))
        key = draw(st.sampled_from(sorted(model))) if model else None
        if key is None:
            break
        t = model[key]
        if action == "noise" and t.is_floating_point() and t.numel():
            model[key] = (t.float() + 0.5).to(t.dtype)
        elif action == "drop" and len(model) > 1:
            del model[key]
        elif action == "add":
            model[draw(st.sampled_from(KEYS + ["extra.key"]))] = _tensor(draw, (2,), torch.float32)
        elif action == "reshape":
            model[key] = _tensor(draw, tuple(draw(st.lists(st.integers(0, 4), max_size=3))), t.dtype)
        elif action == "dtype":
            model[key] = _tensor(draw, tuple(t.shape), draw(st.sampled_from(DTYPES)))
        elif action == "nan" and t.is_floating_point() and t.numel():
            flat = t.reshape(-1).clone()
            flat[0] = draw(st.sampled_from(SPECIAL))
            model[key] = flat.view(t.shape)
    return model


def _assert_valid(pre: dict, models: list[dict], keys: list[str]) -> None:
    """What validate_inputs promises when it returns."""
    assert keys == sorted(k for k, v in pre.items() if v.is_floating_point())
    for m in models:
        assert m.keys() == pre.keys()
        for k, v in pre.items():
            assert m[k].shape == v.shape and m[k].dtype == v.dtype
    for sd in [pre, *models]:
        for k in keys:
            assert bool(torch.isfinite(sd[k].float()).all()), k


def _check_error(error: MergeInputError, names: list[str]) -> None:
    message = str(error)
    assert "\n" not in message
    assert any(name in message for name in names) or "non-empty list" in message, message


@FUZZ
@given(data=st.data())
def test_validate_inputs_from_files_never_crashes(data):
    pre = data.draw(state_dicts())
    models = [_mutate(data.draw, pre) for _ in range(data.draw(st.integers(1, 3)))]
    if len(models) > 1 and data.draw(st.booleans()):  # a copy of another model under a new name
        models[-1] = {k: v.clone() for k, v in models[0].items()}
    repeat = data.draw(st.booleans()) and data.draw(st.integers(0, 3)) == 0
    with tempfile.TemporaryDirectory() as tmp:
        pre_path = Path(tmp) / "pre.safetensors"
        save_state_dict(pre_path, pre)
        paths = []
        for i, m in enumerate(models):
            paths.append(Path(tmp) / f"model{i}.safetensors")
            save_state_dict(paths[-1], m)
        if repeat:
            paths.append(paths[0])
        names = ["pre.safetensors"] + [p.name for p in paths]
        for pretrained in (pre_path, load_state_dict(pre_path)):
            try:
                keys = validate_inputs(pretrained, paths)
            except MergeInputError as error:
                _check_error(error, names + ["θ_pre"])
                event(f"refused: {str(error).split(': ', 1)[-1][:28]}")
            else:
                event("valid")
                assert not repeat
                loaded = [load_state_dict(p) for p in paths]
                _assert_valid(load_state_dict(pre_path), loaded, keys)

                def same(a, b):
                    return all(torch.equal(a[k], b[k]) for k in keys)

                for i in range(len(loaded)):  # two identical models pass only as copies of θ_pre (a warning)
                    for j in range(i + 1, len(loaded)):
                        assert not same(loaded[i], loaded[j]) or same(loaded[i], pre)


@FUZZ
@given(data=st.data())
def test_task_vector_never_crashes(data):
    pre = data.draw(state_dicts())
    model = _mutate(data.draw, pre)
    try:
        tau = task_vector(model, pre)
    except MergeInputError as error:
        assert "\n" not in str(error)
        event("refused")
    else:
        event("valid")
        assert set(tau) == {k for k, v in pre.items() if v.is_floating_point()}
        for k, v in tau.items():
            assert v.shape == pre[k].shape and v.dtype in (torch.float32, torch.float64)


@FUZZ
@given(blob=st.binary(max_size=300), cut=st.integers(0, 400), flips=st.lists(st.integers(0, 399), max_size=4))
def test_safetensors_reader_on_random_and_damaged_bytes(blob, cut, flips):
    with tempfile.TemporaryDirectory() as tmp:
        good = Path(tmp) / "good.safetensors"
        save_state_dict(good, {"w": torch.arange(12.0).view(3, 4), "b": torch.ones(2, dtype=torch.int64)}, {"task": "x"})
        data = bytearray(good.read_bytes())
        for f in flips:
            data[f % len(data)] ^= 0xFF
        for content in (blob, bytes(data[:cut]), bytes(data)):
            path = Path(tmp) / "fuzz.safetensors"
            path.write_bytes(content)
            try:
                with SafetensorsReader(path) as reader:
                    for key in reader.keys():
                        reader.get(key)
            except MergeInputError as error:
                assert "fuzz.safetensors" in str(error) and "\n" not in str(error)


HPARAM_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-200, 200), st.floats(allow_nan=True, allow_infinity=True),
                          st.text(max_size=6), st.lists(st.floats(-2, 2), max_size=3), st.sampled_from(["sum", "mean", "ties", "task_arithmetic", "layer", "task"]))
HPARAM_KEYS = st.sampled_from(["k", "coefficient", "disjoint", "p", "seed", "base", "top", "bottom", "lam", "alpha",
                               "gram_batches", "steps", "init", "lr", "granularity", "topk"])
METHODS = st.sampled_from(["task_arithmetic", "weight_average", "ties", "TIES", "dare", "breadcrumbs", "consensus",
                           "regmean", "adamerging", "fisher", ""])


@FUZZ
@given(method=METHODS, hparams=st.one_of(st.dictionaries(HPARAM_KEYS, HPARAM_VALUES, max_size=4), HPARAM_VALUES),
       coefficients=st.one_of(st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3)), max_size=3),
                              st.none(), st.text(max_size=3)),
       n_models=st.integers(1, 4))
def test_merge_hyperparameter_checks_never_crash(method, hparams, coefficients, n_models):
    from evaluation.merge_eval import validate_plan_entry

    entry = {"method": method, "hparams": hparams, "coefficients": coefficients, "select_on": None}
    try:
        validate_plan_entry(entry, n_models)
    except MergeInputError as error:
        assert "\n" not in str(error)
        event("refused")
    else:
        event("valid")
        for c in coefficients or []:
            assert math.isfinite(float(c))


TRIGGER_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 40), st.integers(2**62, 2**70),
                           st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                           st.sampled_from(["patch", "blend", "center", "top_left", "bottom_right"]),
                           st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
TRIGGER_KEYS = st.one_of(st.sampled_from(["kind", "size", "location", "alpha", "seed"]), st.text(max_size=5), st.integers(0, 3))
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


PLAUSIBLE_SPECS = st.fixed_dictionaries({}, optional={
    "kind": st.sampled_from(["patch", "blend", "Patch", ""]), "size": st.integers(-1, 30),
    "location": st.sampled_from(["bottom_right", "top_left", "top_right", "bottom_left", "center", "middle"]),
    "alpha": st.one_of(st.floats(-0.5, 1.5), st.just(float("nan"))), "seed": st.integers(-3, 2**64)})


@FUZZ
@given(spec=st.one_of(PLAUSIBLE_SPECS, st.dictionaries(TRIGGER_KEYS, TRIGGER_VALUES, max_size=6), TRIGGER_VALUES),
       image_size=st.one_of(st.integers(-2, 40), st.floats(allow_nan=True), st.none()), batch=st.integers(1, 3))
def test_trigger_specs_never_crash(spec, image_size, batch):
    try:
        parsed = TriggerSpec.from_dict(spec).check(image_size)
    except TriggerError as error:
        assert "\n" not in str(error)
        event("refused")
        return
    event("valid")
    assert parsed.kind in ("patch", "blend") and isinstance(parsed.size, int) and parsed.size >= 1
    assert parsed.kind == "blend" or parsed.size <= image_size
    assert 0 < parsed.alpha < 1 and 0 <= parsed.seed < 2**63
    x = torch.randn(batch, 3, image_size, image_size)
    trigger = init_patch(parsed, MEAN, STD) if parsed.kind == "patch" else init_pattern(parsed, MEAN, STD, image_size)
    out = apply_trigger(x, trigger, parsed)
    assert out.shape == x.shape and bool(torch.isfinite(out).all())


@st.composite
def plausible_attacks(draw):
    """Attack metadata as BackdoorInjection writes it, with one or two fields possibly damaged."""
    spec = draw(PLAUSIBLE_SPECS)
    attack = {"trigger": spec, "mean": list(MEAN), "std": list(STD)}
    if draw(st.booleans()):
        size = spec.get("size", 4) if isinstance(spec.get("size", 4), int) and 0 < spec.get("size", 4) < 8 else 4
        shape = draw(st.sampled_from([(3, size, size), (3, 2, 2), (2, size, size)]))
        attack["trigger_values"] = torch.randn(shape).tolist()
        if draw(st.booleans()):
            attack["trigger_values"][0][0][0] = draw(st.sampled_from(SPECIAL + [None, "x", [1.0]]))
    for key in draw(st.lists(st.sampled_from(["trigger", "mean", "std", "trigger_values"]), max_size=2)):
        attack[key] = draw(TRIGGER_VALUES)
    return attack


@FUZZ
@given(attack=st.one_of(plausible_attacks(), st.dictionaries(st.sampled_from(["trigger", "trigger_values", "mean", "std", "x"]),
                                        st.one_of(TRIGGER_VALUES, st.fixed_dictionaries({"kind": st.sampled_from(["patch", "blend"]),
                                                                                          "size": st.integers(-1, 30)}),
                                                  st.lists(st.lists(st.lists(st.floats(allow_nan=True), max_size=4), max_size=4), max_size=3),
                                                  st.lists(st.floats(-1, 1, allow_nan=False), min_size=3, max_size=3)),
                                        max_size=5), TRIGGER_VALUES),
       image_size=st.integers(1, 30))
def test_attack_metadata_never_crashes(attack, image_size):
    try:
        tensor, spec = trigger_from_attack(attack, image_size)
    except TriggerError as error:
        assert "\n" not in str(error)
        event("refused")
        return
    event("valid")
    assert tensor.dim() == 3 and bool(torch.isfinite(tensor).all())


@pytest.mark.parametrize("bad", [{"kind": "patch", "size": 30}, {"seed": -1}, {"alpha": None}, {"alpha": "x"},
                                 {1: 2, "a": 3}, ["kind"], {"location": ["center"]}])
def test_trigger_spec_examples_hypothesis_found(bad):
    with pytest.raises(TriggerError):
        TriggerSpec.from_dict(bad).check(24)


@pytest.mark.parametrize("attack", [{"trigger": 5, "mean": [0, 0, 0], "std": [1, 1, 1]},
                                    {"trigger": {}, "mean": "abc", "std": [1, 1, 1]},
                                    {"trigger": {}, "mean": [0, 0, 0], "std": [1, 1, 1], "trigger_values": [[1], [1, 2]]},
                                    {"trigger": {}, "mean": [0, 0, 0], "std": [0, 1, 1]}, ["trigger"]])
def test_attack_metadata_examples_hypothesis_found(attack):
    with pytest.raises(TriggerError):
        trigger_from_attack(attack, 24)
