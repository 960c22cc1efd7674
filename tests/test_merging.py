"""merging/: IO, task vectors and every merge method against small reference implementations."""

from __future__ import annotations

import math
import os
import pickle
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from merging import (
    MERGE_METHODS,
    MergeInputError,
    add_vector,
    breadcrumbs,
    build_plan,
    consensus,
    dare,
    get_merge_method,
    is_mergeable,
    load_metadata,
    load_state_dict,
    method_hyperparameters,
    open_state_dict,
    read_header_metadata,
    save_state_dict,
    task_arithmetic,
    task_vector,
    ties_merge,
    weight_average,
)
from merging.engine import dare_keep_mask

ATOL = 1e-6


# ---------------------------------------------------------------------------------------------
# fixtures and reference implementations (deliberately naive: explicit flatten, loops)
# ---------------------------------------------------------------------------------------------
SHAPES = {"blocks.0.weight": (6, 5), "blocks.0.bias": (6,), "blocks.1.weight": (3, 4, 2), "head": (7,)}


def make_models(n: int, seed: int = 0, shapes=SHAPES, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    pre = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    pre["steps"] = torch.tensor([11, 12], dtype=torch.int64)  # int buffer: copied, never merged
    vectors = [{k: scale * torch.randn(s, generator=gen) for k, s in shapes.items()} for _ in range(n)]
    return pre, vectors


def round_half_up(total: int, fraction) -> int:
    return math.floor(Fraction(total) * Fraction(fraction) + Fraction(1, 2))


def flatten(vector, keys):
    return torch.cat([vector[k].reshape(-1) for k in keys])


def unflatten(flat, like, keys):
    out, offset = {}, 0
    for k in keys:
        n = like[k].numel()
        out[k] = flat[offset:offset + n].reshape(like[k].shape)
        offset += n
    return out


def with_delta(pre, delta):
    merged = {k: v.clone() for k, v in pre.items()}
    for k, d in delta.items():
        merged[k] = pre[k] + d
    return merged


def reference_ta(pre, vectors, coefficient):
    delta = {}
    for k in vectors[0]:
        total = torch.zeros_like(pre[k])
        for v in vectors:
            total = total + v[k]
        delta[k] = coefficient * total
    return with_delta(pre, delta)


def reference_ties(pre, vectors, k, coefficient, disjoint, trim="threshold"):
    keys = sorted(vectors[0])
    flats = [flatten(v, keys) for v in vectors]
    total = flats[0].numel()
    trimmed = []
    for flat in flats:
        mask = torch.zeros_like(flat, dtype=torch.bool)
        if trim == "threshold":  # TIES reference code: every |tau| >= the (int(P k%) + 1)-th largest
            rank = min(int(total * (k / 100)) + 1, total)
            mask = flat.abs() >= torch.sort(flat.abs(), descending=True).values[rank - 1]
        else:  # exact_k: round(k% P) entries, ties: lower index first
            order = torch.sort(flat.abs(), descending=True, stable=True).indices
            mask[order[:round_half_up(total, Fraction(k) / 100)]] = True
        trimmed.append(flat * mask)
    stacked = torch.stack(trimmed)
    sign = torch.sign(stacked.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())  # TIES reference: zeros take the majority sign
    keep = torch.where(sign > 0, stacked > 0, stacked < 0) & (sign != 0)
    selected = stacked * keep
    merged = selected.sum(0)
    if disjoint == "mean":
        merged = merged / keep.sum(0).clamp(min=1)
    return with_delta(pre, {k: coefficient * v for k, v in unflatten(merged, pre, keys).items()})


def reference_dare_vectors(vectors, p, seed):
    out = []
    for task, v in enumerate(vectors):
        dropped = {}
        for k, t in v.items():
            keep = dare_keep_mask(seed, task, k, 0, t.numel(), p).reshape(t.shape)
            dropped[k] = torch.where(keep, t / (1 - p), torch.zeros(()))
        out.append(dropped)
    return out


def reference_breadcrumbs(pre, vectors, top, bottom, coefficient):
    masked = []
    for v in vectors:
        mv = {}
        for k, t in v.items():
            flat = t.reshape(-1)
            n = flat.numel()
            order = torch.argsort(flat.abs(), stable=True)  # ascending |tau|, ties by index
            lo, hi = round_half_up(n, bottom), n - round_half_up(n, top)
            mask = torch.zeros(n, dtype=torch.bool)
            if lo < hi:
                mask[order[lo:hi]] = True
            mv[k] = (flat * mask).reshape(t.shape)
        masked.append(mv)
    return reference_ta(pre, masked, coefficient)


def reference_consensus(pre, vectors, k, lam, coefficient):
    lams = lam if isinstance(lam, (list, tuple)) else [lam] * len(vectors)
    delta = {}
    for key in vectors[0]:
        mtl = sum(v[key] for v in vectors)
        votes = sum((v[key].abs() > l * (mtl - v[key]).abs()).int() for v, l in zip(vectors, lams))
        delta[key] = coefficient * sum(v[key] * (votes >= k) for v in vectors)
    return with_delta(pre, delta)


def assert_state_dicts_close(actual, expected, atol=ATOL):
    assert list(actual) == list(expected)
    for k in expected:
        assert actual[k].dtype == expected[k].dtype, k
        assert actual[k].shape == expected[k].shape, k
        if expected[k].is_floating_point():
            torch.testing.assert_close(actual[k], expected[k], atol=atol, rtol=0, msg=k)
        else:
            assert torch.equal(actual[k], expected[k]), k


# ---------------------------------------------------------------------------------------------
# methods vs references
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("coefficient", [0.3, 1.0, -0.5])
def test_task_arithmetic_matches_reference(coefficient):
    pre, vectors = make_models(3)
    assert_state_dicts_close(task_arithmetic(pre, vectors, coefficient=coefficient),
                             reference_ta(pre, vectors, coefficient))


def test_task_arithmetic_per_task_coefficients():
    pre, vectors = make_models(3)
    merged = task_arithmetic(pre, vectors, coefficient=[0.1, 0.2, 0.7])
    scaled = [{k: c * t for k, t in v.items()} for c, v in zip([0.1, 0.2, 0.7], vectors)]
    assert_state_dicts_close(merged, reference_ta(pre, scaled, 1.0))
    with pytest.raises(MergeInputError, match="3 task vectors"):
        task_arithmetic(pre, vectors, coefficient=[0.1, 0.2])


def test_weight_average_is_mean_of_models():
    pre, vectors = make_models(4)
    merged = weight_average(pre, vectors)
    for k in vectors[0]:
        models = [pre[k] + v[k] for v in vectors]
        torch.testing.assert_close(merged[k], sum(models) / 4, atol=ATOL, rtol=0)
    assert torch.equal(merged["steps"], pre["steps"])


@pytest.mark.parametrize("k", [20.0, 37.5, 100.0, 0.001])
@pytest.mark.parametrize("disjoint", ["sum", "mean"])
def test_ties_matches_reference(k, disjoint):
    pre, vectors = make_models(4, seed=1)
    assert_state_dicts_close(ties_merge(pre, vectors, k=k, coefficient=0.7, disjoint=disjoint),
                             reference_ties(pre, vectors, k, 0.7, disjoint))


@pytest.mark.parametrize("disjoint", ["sum", "mean"])
def test_ties_with_many_exact_ties_keeps_exactly_k_percent(disjoint):
    # magnitudes from {0, 0.5, 1, 1.5}: the global threshold falls inside a large tie group
    gen = torch.Generator().manual_seed(3)
    pre = {k: torch.randint(-8, 8, s, generator=gen) / 4.0 for k, s in SHAPES.items()}
    vectors = [{k: torch.randint(-3, 4, s, generator=gen) / 2.0 for k, s in SHAPES.items()} for _ in range(3)]
    for trim in ("threshold", "exact_k"):
        merged = ties_merge(pre, vectors, k=30, coefficient=1.0, disjoint=disjoint, trim=trim)
        assert_state_dicts_close(merged, reference_ties(pre, vectors, 30, 1.0, disjoint, trim))
    # one model, k=30, exact_k: exactly round(0.3 P) entries move
    single = ties_merge(pre, vectors[:1], k=30, coefficient=1.0, trim="exact_k")
    total = sum(t.numel() for t in vectors[0].values())
    nonzero = sum(int((t != 0).sum()) for t in vectors[0].values())
    moved = sum(int((single[k] != pre[k]).sum()) for k in SHAPES)
    assert moved == min(round_half_up(total, Fraction(3, 10)), nonzero)


@pytest.mark.parametrize("majority", [1, -1])
def test_ties_exact_cancellation_takes_majority_sign(majority):
    pre = {"w": torch.zeros(5)}
    # entry 0 cancels exactly (1 + -1); the other entries set the majority sign of the elected vector
    tail = [2.0, 2.0, 2.0, -2.0] if majority > 0 else [-2.0, -2.0, -2.0, 2.0]
    vectors = [{"w": torch.tensor([1.0, *tail])}, {"w": torch.tensor([-1.0, *tail])}]
    for disjoint in ("sum", "mean"):
        merged = ties_merge(pre, vectors, k=100, coefficient=1.0, disjoint=disjoint)
        assert merged["w"][0].item() == float(majority)
        assert_state_dicts_close(merged, reference_ties(pre, vectors, 100, 1.0, disjoint))


@pytest.mark.parametrize("base,extra", [("task_arithmetic", {}), ("ties", {"k": 40.0, "disjoint": "mean"})])
def test_dare_matches_reference(base, extra):
    pre, vectors = make_models(3, seed=2)
    merged = dare(pre, vectors, p=0.4, seed=7, base=base, coefficient=0.5, **extra)
    dropped = reference_dare_vectors(vectors, 0.4, 7)
    if base == "ties":
        expected = reference_ties(pre, dropped, extra["k"], 0.5, extra["disjoint"])
    else:
        expected = reference_ta(pre, dropped, 0.5)
    assert_state_dicts_close(merged, expected)


def test_dare_mask_is_seeded_uniform_and_slice_consistent():
    mask = dare_keep_mask(0, 1, "blocks.0.weight", 0, 200_000, 0.3)
    assert abs(mask.float().mean().item() - 0.7) < 0.01
    assert torch.equal(mask, dare_keep_mask(0, 1, "blocks.0.weight", 0, 200_000, 0.3))
    assert torch.equal(mask[1000:1500], dare_keep_mask(0, 1, "blocks.0.weight", 1000, 1500, 0.3))
    for other in [(1, 1, "blocks.0.weight"), (0, 2, "blocks.0.weight"), (0, 1, "head")]:
        assert not torch.equal(mask, dare_keep_mask(*other, 0, 200_000, 0.3))
    assert dare_keep_mask(0, 0, "x", 0, 1000, 0.0).all()
    # nested masks: entries kept at p=0.6 are kept at p=0.3 (same uniforms)
    assert (dare_keep_mask(5, 0, "x", 0, 5000, 0.6) <= dare_keep_mask(5, 0, "x", 0, 5000, 0.3)).all()


@pytest.mark.parametrize("top,bottom", [(0.01, 0.85), (0.1, 0.5), (0.0, 0.0), (0.5, 0.5)])
def test_breadcrumbs_matches_reference(top, bottom):
    pre, vectors = make_models(3, seed=4)
    assert_state_dicts_close(breadcrumbs(pre, vectors, top=top, bottom=bottom, coefficient=0.4),
                             reference_breadcrumbs(pre, vectors, top, bottom, 0.4))


@pytest.mark.parametrize("k,lam", [(2, 0.4), (1, 0.2), (3, [0.3, 0.5, 0.6])])
def test_consensus_matches_reference(k, lam):
    pre, vectors = make_models(3, seed=5)
    assert_state_dicts_close(consensus(pre, vectors, k=k, lam=lam, coefficient=0.3),
                             reference_consensus(pre, vectors, k, lam, 0.3))


@pytest.mark.parametrize("name", sorted(MERGE_METHODS))
def test_methods_leave_inputs_untouched_and_copy_int_buffers(name):
    pre, vectors = make_models(2, seed=6)
    pre_copy = {k: v.clone() for k, v in pre.items()}
    vectors_copy = [{k: t.clone() for k, t in v.items()} for v in vectors]
    merged = get_merge_method(name)(pre, vectors)
    for k in pre:
        assert torch.equal(pre[k], pre_copy[k])
    for v, c in zip(vectors, vectors_copy):
        assert all(torch.equal(v[k], c[k]) for k in v)
    assert torch.equal(merged["steps"], pre["steps"]) and merged["steps"] is not pre["steps"]
    assert list(merged) == list(pre)


def test_float64_and_half_models():
    pre, vectors = make_models(3, seed=8)
    pre64 = {k: v.double() if v.is_floating_point() else v for k, v in pre.items()}
    vec64 = [{k: t.double() for k, t in v.items()} for v in vectors]
    merged = ties_merge(pre64, vec64, k=25)
    assert merged["head"].dtype == torch.float64
    assert_state_dicts_close(merged, reference_ties(pre64, vec64, 25, 0.3, "sum"), atol=1e-12)
    pre16 = {k: v.half() if v.is_floating_point() else v for k, v in pre.items()}
    merged16 = task_arithmetic(pre16, vectors)
    assert merged16["head"].dtype == torch.float16


# ---------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------
small_models = st.tuples(st.integers(1, 4), st.integers(0, 2**31 - 1), st.integers(1, 5), st.integers(1, 6))


def models_from(n, seed, rows, cols):
    return make_models(n, seed=seed, shapes={"a.weight": (rows, cols), "a.bias": (rows,), "b": (cols, 2)})


@settings(max_examples=30, deadline=None)
@given(small_models, st.randoms(use_true_random=False), st.floats(-2, 2))
def test_property_task_arithmetic_is_order_invariant(spec, rng, coefficient):
    pre, vectors = models_from(*spec)
    shuffled = list(vectors)
    rng.shuffle(shuffled)
    assert_state_dicts_close(task_arithmetic(pre, shuffled, coefficient=coefficient),
                             task_arithmetic(pre, vectors, coefficient=coefficient), atol=2e-6)


@settings(max_examples=30, deadline=None)
@given(small_models, st.floats(-2, 2), st.sampled_from(["sum", "mean"]))
def test_property_ties_k100_single_model_is_task_arithmetic(spec, coefficient, disjoint):
    pre, vectors = models_from(1, *spec[1:])
    assert_state_dicts_close(ties_merge(pre, vectors, k=100, coefficient=coefficient, disjoint=disjoint),
                             task_arithmetic(pre, vectors, coefficient=coefficient))


@settings(max_examples=30, deadline=None)
@given(small_models, st.integers(0, 1000), st.floats(-2, 2))
def test_property_dare_p0_is_task_arithmetic(spec, seed, coefficient):
    pre, vectors = models_from(*spec)
    assert_state_dicts_close(dare(pre, vectors, p=0.0, seed=seed, coefficient=coefficient),
                             task_arithmetic(pre, vectors, coefficient=coefficient))


@settings(max_examples=30, deadline=None)
@given(small_models)
def test_property_weight_average_of_identical_models_is_that_model(spec):
    n, seed, rows, cols = spec
    pre, vectors = models_from(1, seed, rows, cols)
    finetuned = add_vector(pre, vectors[0])
    tau = task_vector(finetuned, pre)
    assert_state_dicts_close(weight_average(pre, [tau] * n), finetuned)


# ---------------------------------------------------------------------------------------------
# registry and validation
# ---------------------------------------------------------------------------------------------
def test_registry_and_defaults():
    assert set(MERGE_METHODS) == {"task_arithmetic", "weight_average", "ties", "dare", "breadcrumbs", "consensus"}
    assert get_merge_method("TIES") is ties_merge
    assert method_hyperparameters("ties") == {"k": 20.0, "coefficient": 0.3, "disjoint": "sum", "trim": "threshold"}
    assert method_hyperparameters("weight_average") == {}
    with pytest.raises(MergeInputError, match="known: task_arithmetic, weight_average, ties"):
        get_merge_method("fisher")


@pytest.mark.parametrize("name,hyperparameters,message", [
    ("ties", {"k": 150}, "k=150"),
    ("ties", {"disjoint": "max"}, "disjoint"),
    ("ties", {"trim": "topk"}, "trim='topk' must be 'threshold'"),
    ("dare", {"base": "ties", "trim": "exact"}, "trim='exact'"),
    ("dare", {"p": 1.0}, "p=1.0"),
    ("dare", {"base": "consensus"}, "base"),
    ("breadcrumbs", {"top": 0.5, "bottom": 0.6}, "top \\+ bottom"),
    ("consensus", {"k": 0}, "k=0"),
])
def test_bad_hyperparameters_are_refused(name, hyperparameters, message):
    pre, vectors = make_models(2)
    with pytest.raises(MergeInputError, match=message):
        get_merge_method(name)(pre, vectors, **hyperparameters)


def test_unknown_hyperparameter_names_the_known_ones():
    with pytest.raises(MergeInputError, match="hyperparameters are: coefficient"):
        build_plan("task_arithmetic", 2, lamda=0.3)
    with pytest.raises(MergeInputError, match="no task vectors"):
        build_plan("ties", 0)
    plan = build_plan("dare", 3, base="ties", k=10.0)
    assert (plan.combine, plan.ties_k, plan.dare_p, plan.coefficient, plan.ties_trim) == ("ties", 10.0, 0.5, 0.3,
                                                                                          "threshold")
    assert build_plan("dare", 3, base="ties", trim="exact_k").ties_trim == "exact_k"


def test_inconsistent_vectors_are_refused_naming_the_key():
    pre, vectors = make_models(2)
    del vectors[1]["head"]
    with pytest.raises(MergeInputError, match="task vector 1 lacks key 'head'"):
        task_arithmetic(pre, vectors)
    pre, vectors = make_models(2)
    vectors[1]["blocks.0.bias"] = torch.zeros(5)
    with pytest.raises(MergeInputError, match="'blocks.0.bias'.*shape"):
        ties_merge(pre, vectors)
    pre, vectors = make_models(2)
    vectors[0]["head"][3] = float("nan")
    with pytest.raises(MergeInputError, match="'head'.*NaN"):
        task_arithmetic(pre, vectors)
    with pytest.raises(MergeInputError, match="non-empty"):
        task_arithmetic(pre, [])
    pre, vectors = make_models(1)
    vectors[0]["steps"] = torch.zeros(2)
    with pytest.raises(MergeInputError, match="'steps'.*only float"):
        task_arithmetic(pre, vectors)


# ---------------------------------------------------------------------------------------------
# task vectors
# ---------------------------------------------------------------------------------------------
def test_task_vector_and_add_vector():
    pre, vectors = make_models(1)
    finetuned = add_vector(pre, vectors[0], coefficient=1.0)
    assert torch.equal(finetuned["steps"], pre["steps"])
    tau = task_vector(finetuned, pre)
    assert set(tau) == set(SHAPES)  # int buffer skipped
    assert not is_mergeable(pre["steps"]) and is_mergeable(pre["head"])
    for k in SHAPES:
        torch.testing.assert_close(tau[k], vectors[0][k], atol=ATOL, rtol=0)
    half = add_vector(pre, tau, coefficient=0.5)
    torch.testing.assert_close(half["head"], pre["head"] + 0.5 * tau["head"])
    bad = dict(finetuned, head=torch.zeros(3))
    with pytest.raises(MergeInputError, match="'head'"):
        task_vector(bad, pre)
    with pytest.raises(MergeInputError, match="lacks key 'head'"):
        task_vector({k: v for k, v in finetuned.items() if k != "head"}, pre)
    with pytest.raises(MergeInputError, match="'nope'"):
        add_vector(pre, {"nope": torch.zeros(1)})


# ---------------------------------------------------------------------------------------------
# IO
# ---------------------------------------------------------------------------------------------
def test_save_load_round_trip_with_metadata(tmp_path):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 6, generator=gen)
    state = {
        "w": weight.t(),  # non-contiguous
        "tied": weight,  # shares storage with "w"
        "half": torch.randn(3, generator=gen).half(),
        "bf16": torch.randn(3, generator=gen).bfloat16(),
        "steps": torch.tensor(5),
        "flags": torch.tensor([True, False]),
        "empty": torch.zeros(0, 3),
    }
    metadata = {"task": "cifar100", "attack": {"target": 3, "trigger": "patch"}, "seed": 0}
    path = tmp_path / "sub" / "model.safetensors"
    save_state_dict(path, state, metadata)
    loaded = load_state_dict(path)
    assert set(loaded) == set(state)
    for k, v in state.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    assert load_metadata(path) == metadata
    assert read_header_metadata(path) == metadata
    assert (tmp_path / "sub" / "model.json").is_file()
    assert sorted(os.listdir(tmp_path / "sub")) == ["model.json", "model.safetensors"]  # no temp files left
    with open_state_dict(path) as lazy:
        assert "w" in lazy and len(lazy) == len(state) and lazy.keys() == sorted(state)
        assert torch.equal(lazy.get("w"), weight.t())
        assert torch.equal(lazy.read_flat("tied", 5, 9), weight.reshape(-1)[5:9])
        assert lazy.shape("w") == (6, 4) and lazy.dtype("half") == torch.float16
    # re-saving without metadata removes the stale sidecar
    save_state_dict(path, {"w": torch.ones(2)})
    assert load_metadata(path) is None and read_header_metadata(path) is None
    assert torch.equal(load_state_dict(path)["w"], torch.ones(2))


def test_missing_corrupt_and_truncated_files_raise_one_line_errors(tmp_path):
    good = tmp_path / "good.safetensors"
    save_state_dict(good, {"w": torch.randn(64, 64)})
    data = good.read_bytes()
    cases = {
        "missing.safetensors": None,
        "truncated.safetensors": data[:-100],
        "header_only.safetensors": data[:20],
        "tiny.safetensors": data[:5],
        "garbage.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\x00" * 64,
        "huge_header.safetensors": (10**12).to_bytes(8, "little") + b"{}",
    }
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(MergeInputError) as info:
            load_state_dict(path)
        message = str(info.value)
        assert name in message and "\n" not in message, message
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "bad.safetensors").write_bytes(data)
    with pytest.raises(MergeInputError, match="bad.json"):
        load_metadata(tmp_path / "bad.safetensors")


class _CreatesFileWhenUnpickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_checkpoints_are_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    raw = tmp_path / "evil.pt"
    raw.write_bytes(pickle.dumps({"w": _CreatesFileWhenUnpickled(marker)}))
    zipped = tmp_path / "evil_zip.pt"
    torch.save({"w": _CreatesFileWhenUnpickled(marker)}, zipped)
    assert not marker.exists()
    for path in (raw, zipped):
        with pytest.raises(MergeInputError, match="pickle"):
            load_state_dict(path)
        with pytest.raises(MergeInputError, match="pickle"):
            open_state_dict(path)
    assert not marker.exists()
