"""merging.streaming: the file engine equals the in-memory methods, validates inputs, reads in chunks."""

from __future__ import annotations

import pytest
import torch

from merging import (
    MergeInputError,
    get_merge_method,
    load_state_dict,
    merge_files,
    save_state_dict,
    task_vector,
    validate_inputs,
)
from merging.io import SafetensorsReader


def vit_state_dict(gen: torch.Generator, width: int = 16, layers: int = 2, patch: int = 4, image: int = 16,
                   out_dim: int = 8, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random open_clip-ViT-shaped image encoder (tiny widths), plus an int64 buffer."""
    shapes = {
        "visual.class_embedding": (width,),
        "visual.positional_embedding": ((image // patch) ** 2 + 1, width),
        "visual.proj": (width, out_dim),
        "visual.conv1.weight": (width, 3, patch, patch),
        "visual.ln_pre.weight": (width,),
        "visual.ln_pre.bias": (width,),
        "visual.ln_post.weight": (width,),
        "visual.ln_post.bias": (width,),
    }
    for i in range(layers):
        block = f"visual.transformer.resblocks.{i}"
        shapes.update({
            f"{block}.ln_1.weight": (width,), f"{block}.ln_1.bias": (width,),
            f"{block}.attn.in_proj_weight": (3 * width, width), f"{block}.attn.in_proj_bias": (3 * width,),
            f"{block}.attn.out_proj.weight": (width, width), f"{block}.attn.out_proj.bias": (width,),
            f"{block}.ln_2.weight": (width,), f"{block}.ln_2.bias": (width,),
            f"{block}.mlp.c_fc.weight": (4 * width, width), f"{block}.mlp.c_fc.bias": (4 * width,),
            f"{block}.mlp.c_proj.weight": (width, 4 * width), f"{block}.mlp.c_proj.bias": (width,),
        })
    state = {k: torch.randn(s, generator=gen).to(dtype) for k, s in shapes.items()}
    state["visual.num_batches_tracked"] = torch.tensor([42], dtype=torch.int64)
    return state


def write_models(tmp_path, n: int, seed: int = 0, dtype=torch.float32, quantized: bool = False):
    """theta_pre and n fine-tuned models on disk; the fine-tuned ones differ by small task vectors."""
    gen = torch.Generator().manual_seed(seed)
    pre = vit_state_dict(gen, dtype=dtype)
    if quantized:  # dyadic values: tau is exact and |tau| has large tie groups
        pre = {k: (torch.randint(-64, 64, v.shape, generator=gen) / 16).to(v.dtype) if v.is_floating_point() else v
               for k, v in pre.items()}
    pre_path = tmp_path / "pre.safetensors"
    save_state_dict(pre_path, pre, {"role": "pretrained"})
    paths = []
    for t in range(n):
        model = {}
        for k, v in pre.items():
            if not v.is_floating_point():
                model[k] = v + t + 1  # fine-tuning may change buffers; the merge copies theta_pre's
            elif quantized:
                model[k] = v + (torch.randint(-3, 4, v.shape, generator=gen) / 64).to(v.dtype)
            else:
                model[k] = (v.float() + 0.01 * torch.randn(v.shape, generator=gen)).to(v.dtype)
        path = tmp_path / f"task{t}.safetensors"
        save_state_dict(path, model, {"task": f"task{t}"})
        paths.append(path)
    return pre_path, paths


def in_memory(pre_path, paths, method, **hyperparameters):
    pre = load_state_dict(pre_path)
    vectors = [task_vector(load_state_dict(p), pre) for p in paths]
    return get_merge_method(method)(pre, vectors, **hyperparameters)


def assert_same(streamed, expected, atol=1e-6):
    assert sorted(streamed) == sorted(expected)
    for k, v in expected.items():
        assert streamed[k].dtype == v.dtype and streamed[k].shape == v.shape, k
        if v.is_floating_point():
            torch.testing.assert_close(streamed[k].double(), v.double(), atol=atol, rtol=0, msg=k)
        else:
            assert torch.equal(streamed[k], v), k


CASES = [
    ("task_arithmetic", {}),
    ("task_arithmetic", {"coefficient": [0.2, 0.5, 1.0]}),
    ("weight_average", {}),
    ("ties", {}),
    ("ties", {"k": 35.0, "disjoint": "mean", "coefficient": 1.0}),
    ("ties", {"k": 0.001}),
    ("ties", {"k": 100.0}),
    ("ties", {"trim": "exact_k"}),
    ("ties", {"k": 0.001, "trim": "exact_k"}),
    ("dare", {"p": 0.3}),
    ("dare", {"p": 0.5, "base": "ties", "k": 30.0, "seed": 3}),
    ("dare", {"p": 0.5, "base": "ties", "k": 30.0, "seed": 3, "trim": "exact_k"}),
    ("breadcrumbs", {}),
    ("breadcrumbs", {"top": 0.1, "bottom": 0.5}),
    ("consensus", {}),
    ("consensus", {"k": 1, "lam": [0.2, 0.4, 0.6]}),
]


@pytest.mark.parametrize("method,hyperparameters", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_streaming_equals_in_memory(tmp_path, method, hyperparameters):
    pre_path, paths = write_models(tmp_path, 3, seed=1)
    expected = in_memory(pre_path, paths, method, **hyperparameters)
    # odd chunk sizes put chunk boundaries inside tensors (and inside TIES tie groups)
    for chunk in (97, None):
        streamed = merge_files(pre_path, paths, method, progress=False, chunk_elements=chunk, **hyperparameters)
        assert_same(streamed, expected)
        assert torch.equal(streamed["visual.num_batches_tracked"], torch.tensor([42]))


@pytest.mark.parametrize("trim", ["threshold", "exact_k"])
@pytest.mark.parametrize("disjoint", ["sum", "mean"])
@pytest.mark.parametrize("k", [20.0, 50.0, 73.0])
def test_streaming_ties_exact_with_large_tie_groups(tmp_path, k, disjoint, trim):
    pre_path, paths = write_models(tmp_path, 4, seed=2, quantized=True)
    expected = in_memory(pre_path, paths, "ties", k=k, disjoint=disjoint, trim=trim)
    streamed = merge_files(pre_path, paths, "ties", progress=False, chunk_elements=13, k=k, disjoint=disjoint,
                           trim=trim)
    assert_same(streamed, expected, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_streaming_other_dtypes(tmp_path, dtype):
    pre_path, paths = write_models(tmp_path, 3, seed=3, dtype=dtype)
    for method, hyperparameters in [("ties", {"k": 20.0}), ("ties", {"k": 20.0, "trim": "exact_k"}),
                                    ("dare", {"base": "ties", "p": 0.2})]:
        expected = in_memory(pre_path, paths, method, **hyperparameters)
        streamed = merge_files(pre_path, paths, method, progress=False, chunk_elements=50, **hyperparameters)
        assert_same(streamed, expected, atol=1e-12 if dtype == torch.float64 else 0)
        assert streamed["visual.proj"].dtype == dtype


def test_streaming_reads_bounded_chunks(tmp_path, monkeypatch):
    pre_path, paths = write_models(tmp_path, 3, seed=4)
    largest = []
    original = SafetensorsReader.read_flat

    def spy(self, key, start=0, stop=None):
        chunk = original(self, key, start, stop)
        largest.append(chunk.numel())
        return chunk

    monkeypatch.setattr(SafetensorsReader, "read_flat", spy)
    for method in ("task_arithmetic", "ties", "consensus"):
        largest.clear()
        merge_files(pre_path, paths, method, progress=False, chunk_elements=64)
        assert max(largest) <= 64, method


def test_progress_bar_can_be_disabled(tmp_path, capsys):
    pre_path, paths = write_models(tmp_path, 2)
    merge_files(pre_path, paths, "ties", progress=False)
    assert capsys.readouterr().err == ""
    merge_files(pre_path, paths, "ties", progress=True)
    assert "merge (ties)" in capsys.readouterr().err


def _rewrite(path, change):
    state = load_state_dict(path)
    change(state)
    save_state_dict(path, state)


@pytest.mark.parametrize("change,message", [
    (lambda s: s.pop("visual.proj"), "task1.safetensors: lacks key 'visual.proj'"),
    (lambda s: s.update(extra=torch.zeros(2)), "task1.safetensors: has key 'extra'"),
    (lambda s: s.update({"visual.proj": torch.zeros(8, 16)}), "task1.safetensors: key 'visual.proj' has shape"),
    (lambda s: s.update({"visual.proj": s["visual.proj"].double()}), "task1.safetensors: key 'visual.proj' is"),
])
def test_validate_inputs_structure(tmp_path, change, message):
    pre_path, paths = write_models(tmp_path, 2)
    _rewrite(paths[1], change)
    with pytest.raises(MergeInputError, match=message):
        validate_inputs(pre_path, paths)
    with pytest.raises(MergeInputError, match=message):
        merge_files(pre_path, paths, "task_arithmetic", progress=False)


def test_validate_inputs_non_finite_duplicates_and_missing(tmp_path):
    pre_path, paths = write_models(tmp_path, 2)
    assert "visual.num_batches_tracked" not in validate_inputs(pre_path, paths)
    _rewrite(paths[0], lambda s: s["visual.transformer.resblocks.1.mlp.c_fc.bias"].__setitem__(5, float("nan")))
    match = "task0.safetensors: key 'visual.transformer.resblocks.1.mlp.c_fc.bias' contains NaN"
    with pytest.raises(MergeInputError, match=match):
        validate_inputs(pre_path, paths)
    for method in ("task_arithmetic", "ties"):  # found during the first sweep, before a result exists
        with pytest.raises(MergeInputError, match=match):
            merge_files(pre_path, paths, method, progress=False, chunk_elements=32)
    pre_path, paths = write_models(tmp_path, 2)
    with pytest.raises(MergeInputError, match="same file as model #0"):
        validate_inputs(pre_path, [paths[0], paths[1], tmp_path / "." / "task0.safetensors"])
    with pytest.raises(MergeInputError, match="same file as the pre-trained model"):
        validate_inputs(pre_path, [pre_path, paths[0]])
    with pytest.raises(MergeInputError, match="nope.safetensors: file not found"):
        validate_inputs(pre_path, [paths[0], tmp_path / "nope.safetensors"])
    with pytest.raises(MergeInputError, match="non-empty list"):
        validate_inputs(pre_path, [])
    with pytest.raises(MergeInputError, match="unknown merge method"):
        merge_files(pre_path, paths, "fisher")
    with pytest.raises(MergeInputError, match="hyperparameters are: k, coefficient, disjoint, trim$"):
        merge_files(pre_path, paths, "ties", topk=20)


def test_num_threads_is_restored(tmp_path):
    pre_path, paths = write_models(tmp_path, 2)
    before = torch.get_num_threads()
    streamed = merge_files(pre_path, paths, "ties", progress=False, num_threads=1)
    assert torch.get_num_threads() == before
    assert_same(streamed, in_memory(pre_path, paths, "ties"))


def test_header_length_with_low_byte_0x80_is_not_taken_for_a_pickle(tmp_path):
    """A safetensors header of 0x..80 bytes starts with the pickle PROTO byte; it must still load."""
    import json

    import torch

    from merging.io import load_state_dict, read_header_metadata, save_state_dict

    for pad in range(0, 300):
        path = tmp_path / "m.safetensors"
        save_state_dict(path, {"w": torch.ones(2)}, {"note": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        raise AssertionError("no header length with low byte 0x80 in the range tried")
    assert torch.equal(load_state_dict(path)["w"], torch.ones(2))
    assert json.loads(json.dumps(read_header_metadata(path)))["note"] == "x" * pad
