"""TIES' trim rule: the reference implementations' threshold rule (default) and the exact-K option.

The reference rule (TIES paper code, src/utils/merge_utils.py, and FusionBench,
fusion_bench/method/ties_merging/ties_merging_utils.py, both ``topk_values_mask``): per task, over the
whole flattened model of P entries, keep every entry with |tau| >= the (int(P * k/100) + 1)-th largest
|tau|, so every entry tied with the threshold is kept. ``trim="exact_k"`` keeps exactly round(k% * P).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

import numpy as np
import pytest
import torch

import merge
from evaluation.merge_methods import resolve_merge_method
from merging import (
    MergeInputError,
    dare,
    load_state_dict,
    merge_files,
    method_hyperparameters,
    save_state_dict,
    task_vector,
    ties_merge,
)

SHAPES = {"a.weight": (40, 25), "a.bias": (40,), "b.weight": (30, 20), "c": (170,), "d.weight": (7, 11, 3)}


# ---------------------------------------------------------------------------------------------
# references, written out plainly
# ---------------------------------------------------------------------------------------------
def loop_reference_mask(values: np.ndarray, k: float) -> np.ndarray:
    """The reference rule as a plain loop: the threshold is the (int(P k%) + 1)-th largest |value|."""
    magnitudes = [abs(float(x)) for x in values]
    total = len(magnitudes)
    rank = min(int(total * (k / 100)) + 1, total)  # the float product P * (k/100), as the reference codes
    threshold = sorted(magnitudes, reverse=True)[rank - 1]
    return np.array([m >= threshold for m in magnitudes], dtype=bool)


def loop_exact_k_mask(values: np.ndarray, k: float) -> np.ndarray:
    """exact_k as a plain loop: the round(k% P) largest |value|, equal ones by lower flat index first."""
    total = len(values)
    keep = math.floor(Fraction(total) * Fraction(k) / 100 + Fraction(1, 2))
    order = sorted(range(total), key=lambda i: (-abs(float(values[i])), i))
    mask = np.zeros(total, dtype=bool)
    for i in order[:keep]:
        mask[i] = True
    return mask


def fusion_bench_ties(tau_rows: torch.Tensor, k: float, disjoint: str) -> torch.Tensor:
    """Our transcription of FusionBench 0.2.x ``ties_merging`` (fusion_bench/method/ties_merging/
    ties_merging_utils.py: ``topk_values_mask``, ``resolve_sign``, ``disjoint_merge``; the same functions as
    the TIES paper's src/utils/merge_utils.py). ``tau_rows``: [n_tasks, P] flattened task vectors, keys sorted."""
    fraction = k / 100 if k > 1 else k  # the reference takes k > 1 as a percentage
    d = tau_rows.shape[1]
    kth_smallest = d - int(d * fraction)
    thresholds = tau_rows.abs().kthvalue(kth_smallest, dim=1, keepdim=True).values
    trimmed = tau_rows * (tau_rows.abs() >= thresholds)
    sign = torch.sign(trimmed.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())  # zeros take the majority sign
    agree = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * agree
    if disjoint == "mean":
        return selected.sum(dim=0) / (selected != 0).sum(dim=0).float().clamp(min=1)
    return selected.sum(dim=0)


# ---------------------------------------------------------------------------------------------
# helpers: a one-task TIES merge with coefficient 1 moves exactly the kept entries (elect = own sign)
# ---------------------------------------------------------------------------------------------
def random_vector(seed: int, shapes=SHAPES, scale: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {key: scale * torch.randn(shape, generator=gen) for key, shape in shapes.items()}


def flat(state: dict[str, torch.Tensor], keys=None) -> torch.Tensor:
    return torch.cat([state[key].reshape(-1).float() for key in sorted(keys or state)])


def kept_mask(pre: dict, tau: dict, **hyperparameters) -> torch.Tensor:
    """Flat bool mask (keys sorted) of the entries one task's TIES trim keeps (tau has no zeros)."""
    merged = ties_merge(pre, [tau], coefficient=1.0, disjoint="sum", **hyperparameters)
    return torch.cat([(merged[key] != pre[key]).reshape(-1) for key in sorted(tau)])


def half_models(dtype: torch.dtype, seed: int = 0, per_key: int = 3000, n_keys: int = 6, n_models: int = 1):
    """θ_pre and fine-tunes in ``dtype``: tau = θ_ft − θ_pre lies on the dtype's grid, so many |tau| tie."""
    gen = torch.Generator().manual_seed(seed)
    pre = {f"layer{i}.weight": torch.randn(per_key, generator=gen).to(dtype) for i in range(n_keys)}
    finetuned = [{key: (value.float() + 0.01 * torch.randn(per_key, generator=gen)).to(dtype)
                  for key, value in pre.items()} for _ in range(n_models)]
    return pre, finetuned


# ---------------------------------------------------------------------------------------------
# the threshold rule against the references
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [20.0, 37.5, 5.0, 0.001, 100.0, 99.99])
def test_threshold_trim_matches_the_loop_reference(k):
    tau = random_vector(1)
    pre = {key: torch.zeros_like(value) for key, value in tau.items()}
    values = flat(tau).numpy()
    expected = loop_reference_mask(values, k)
    actual = kept_mask(pre, tau, k=k).numpy()
    assert np.array_equal(actual, expected)
    total = values.size
    assert actual.sum() == min(int(total * (k / 100)) + 1, total)  # continuous values: no ties at the threshold
    assert kept_mask(pre, tau, k=k, trim="threshold").numpy().tolist() == actual.tolist()  # the default


def test_threshold_count_follows_the_references_float_product():
    # P = 100, k = 29: the reference computes int(100 * 0.29) = int(28.999999999999996) = 28, keeps 28 + 1
    tau = {"w": torch.arange(1, 101, dtype=torch.float32)}
    pre = {"w": torch.zeros(100)}
    assert int(100 * (29 / 100)) == 28
    assert int(kept_mask(pre, tau, k=29).sum()) == 29
    assert np.array_equal(kept_mask(pre, tau, k=29).numpy(), loop_reference_mask(tau["w"].numpy(), 29))
    assert int(kept_mask(pre, tau, k=20).sum()) == 21  # int(100 * 0.2) + 1


@pytest.mark.parametrize("disjoint", ["sum", "mean"])
def test_ties_matches_the_fusion_bench_transcription(disjoint):
    taus = [random_vector(seed, scale=0.01) for seed in range(2, 6)]
    pre = random_vector(9)
    keys = sorted(pre)
    merged = ties_merge(pre, taus, k=20, coefficient=0.3, disjoint=disjoint)
    reference = flat(pre) + 0.3 * fusion_bench_ties(torch.stack([flat(t) for t in taus]), 20, disjoint)
    torch.testing.assert_close(flat(merged, keys), reference, atol=1e-6, rtol=0)
    # the exact-K option keeps round(0.2 P) = int(0.2 P) entries here, one fewer per task than the reference
    total = reference.numel()
    assert round(0.2 * total) == int(0.2 * total)
    exact = ties_merge(pre, taus, k=20, coefficient=0.3, disjoint=disjoint, trim="exact_k")
    assert (flat(exact, keys) - reference).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------
# many equal magnitudes (fp16 / bf16 models)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_ties_are_all_kept_and_density_is_even_across_keys(dtype):
    pre, (finetuned,) = half_models(dtype)
    tau = task_vector(finetuned, pre)
    keys = sorted(tau)
    values = flat(tau)
    magnitudes = values.abs()
    total = values.numel()
    threshold = torch.sort(magnitudes, descending=True).values[int(total * 0.2)]  # the (int(0.2 P) + 1)-th largest
    tied = magnitudes == threshold
    assert int(tied.sum()) > 200  # the threshold falls inside a large tie group
    assert threshold > 0

    def per_key(mask):
        sizes = [tau[key].numel() for key in keys]
        return [(part, tie) for part, tie in zip(torch.split(mask, sizes), torch.split(tied, sizes))]

    merged = ties_merge(pre, [tau], k=20, coefficient=1.0)
    kept = torch.cat([(merged[key] != pre[key]).reshape(-1) for key in keys])
    assert torch.equal(kept, torch.from_numpy(loop_reference_mask(values.numpy(), 20)))
    densities = [float(part.float().mean()) for part, _ in per_key(kept)]
    assert max(densities) - min(densities) < 0.05, densities
    assert all(bool(part[tie].all()) for part, tie in per_key(kept))  # every tie kept, in every key

    # exact_k cuts the tie group by flat index: the first key keeps all its ties, the last none
    exact = ties_merge(pre, [tau], k=20, coefficient=1.0, trim="exact_k")
    kept_exact = torch.cat([(exact[key] != pre[key]).reshape(-1) for key in keys])
    assert int(kept_exact.sum()) == round(0.2 * total)
    tie_share = [float(part[tie].float().mean()) for part, tie in per_key(kept_exact)]
    assert tie_share[0] == 1.0 and tie_share[-1] == 0.0, tie_share


@pytest.mark.parametrize("k", [20.0, 12.5, 63.0])
def test_exact_k_keeps_exactly_round_k_percent(k):
    for tau in (random_vector(3), {key: torch.randint(1, 4, v.shape).float() for key, v in random_vector(4).items()}):
        pre = {key: torch.zeros_like(value) for key, value in tau.items()}
        values = flat(tau).numpy()
        kept = kept_mask(pre, tau, k=k, trim="exact_k").numpy()
        assert kept.sum() == math.floor(Fraction(values.size) * Fraction(k) / 100 + Fraction(1, 2))
        assert np.array_equal(kept, loop_exact_k_mask(values, k))


# ---------------------------------------------------------------------------------------------
# streaming = in memory, both rules
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trim", ["threshold", "exact_k"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_streaming_trim_equals_in_memory(tmp_path, dtype, trim):
    pre, finetuned = half_models(dtype, seed=5, per_key=700, n_keys=4, n_models=2)
    paths = []
    for name, state in (("pre", pre), ("a", finetuned[0]), ("b", finetuned[1])):
        paths.append(tmp_path / f"{name}.safetensors")
        save_state_dict(paths[-1], state)
    vectors = [task_vector(load_state_dict(p), pre) for p in paths[1:]]
    for hyperparameters in ({"k": 20.0}, {"k": 45.0, "disjoint": "mean"}):
        expected = ties_merge(pre, vectors, trim=trim, **hyperparameters)
        for chunk in (7, 333, None):  # boundaries inside tensors and inside the tie groups
            streamed = merge_files(paths[0], paths[1:], "ties", progress=False, chunk_elements=chunk, trim=trim,
                                   **hyperparameters)
            for key in pre:
                assert torch.equal(streamed[key], expected[key]), (key, chunk)
    expected = dare(pre, vectors, p=0.3, base="ties", trim=trim)
    streamed = merge_files(paths[0], paths[1:], "dare", progress=False, chunk_elements=50, p=0.3, base="ties", trim=trim)
    assert all(torch.equal(streamed[key], expected[key]) for key in pre)


# ---------------------------------------------------------------------------------------------
# the hyperparameter
# ---------------------------------------------------------------------------------------------
def test_trim_is_a_ties_hyperparameter_passed_through_unchanged():
    assert method_hyperparameters("ties")["trim"] == "threshold"
    method = resolve_merge_method("ties")
    assert method.defaults()["trim"] == "threshold"
    method.validate({**method.defaults(), "trim": "exact_k"}, n_models=2, where="ties")
    with pytest.raises(MergeInputError, match=r"^ties: trim='topk' must be 'threshold' .* or 'exact_k'"):
        method.validate({**method.defaults(), "trim": "topk"}, n_models=2, where="ties")
    dare_method = resolve_merge_method("dare")
    with pytest.raises(MergeInputError, match=r"^ties: trim='exact' must be"):
        dare_method.validate({**dare_method.defaults(), "base": "ties", "trim": "exact"}, n_models=2, where="dare")


def test_merge_py_refuses_an_unknown_trim_rule(base, tmp_path, capsys, session_cache):
    """ERRORS.md: bad TIES trim rule -> one line, exit 2, no output."""
    theta_pre = base.encoder_state_dict()
    models = []
    for i, task in enumerate(("shapes", "digits")):
        gen = torch.Generator().manual_seed(i)
        state = {k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                 for k, v in theta_pre.items()}
        models.append(tmp_path / f"{task}.safetensors")
        save_state_dict(models[-1], state, {"kind": "finetune", "task": task, "base_model": base.describe(), "attack": None})
    out, export = tmp_path / "out", tmp_path / "merged.safetensors"
    argv = ["--models", *map(str, models), "--method", "ties", "--hparams", "{trim: topk}", "--cache_dir", session_cache,
            "--out_dir", str(out), "--export", str(export)]
    assert merge.main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("merge.py: error: ")]
    assert len(lines) == 1, lines
    assert re.fullmatch(r"merge\.py: error: ties: trim='topk' must be 'threshold' \(the reference TIES rule: every "
                        r"\|tau\| >= the threshold, ties kept\) or 'exact_k' \(exactly round\(k% \* P\) entries\)", lines[0]), lines
    assert not out.exists() and not export.exists()
