"""No silent wrong numbers: coefficients finite in the dtype of the weights they scale, merged (and defended) weights
finite before they are evaluated or exported, and input weights too large for the forward pass refused.

The one-line merge.py / sweep.py messages of these cases are pinned in ``tests/test_error_catalogue.py`` (ERRORS.md
M30-M33, S16); here are the API-level checks, the other dtypes and the legitimate side of every rule.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import merge
from evaluation.merge_eval import MergeEvalRequest, PlanEntry, validate_plan_entry, validate_request, weights_dtype
from merging.io import MergeInputError, load_metadata, load_state_dict, save_state_dict
from merging.streaming import MAX_WEIGHT_SCALE, first_non_finite, validate_inputs
from merging.task_vectors import not_finite_in

KEY = "transformer.resblocks.0.mlp.c_fc.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory, base):
    """Two exports (θ_pre + small random τ) with metadata; the second has τ = +5 on KEY, so λ = 3e38 overflows."""
    from conftest import export_models

    def bump(i, sd):
        if i == 1:
            sd[KEY] = sd[KEY] + 5.0

    return export_models(tmp_path_factory.mktemp("numeric"), base, bump)


def _cast_copy(path: Path, dtype: torch.dtype, out: Path) -> str:
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_state_dict(path).items()}
    save_state_dict(out, sd, load_metadata(path))
    return str(out)


# -- 1. coefficients (and every weight-scaling hyperparameter) finite in the weights' dtype --
def test_not_finite_in_each_dtype():
    assert not_finite_in(1e39, torch.float32) and not_finite_in(-1e39, torch.float32)
    assert not_finite_in(3e38, torch.float32) is None and not_finite_in(1e39, torch.float64) is None
    assert not_finite_in(1e5, torch.float16) and not_finite_in(6e4, torch.float16) is None
    assert not_finite_in(1e5, torch.bfloat16) is None and not_finite_in(1e39, torch.bfloat16)
    assert not_finite_in(10**400, torch.float64) == "is not finite"  # an int beyond float64


@pytest.mark.parametrize("entry, pattern", [
    ({"method": "task_arithmetic", "coefficients": [0.3, 1e39]}, r"task_arithmetic: coefficient=1e\+39 is not finite in float32"),
    ({"method": "task_arithmetic", "hparams": {"coefficient": [0.3, 1e39]}}, r"coefficient=1e\+39 is not finite in float32"),
    ({"method": "ties", "coefficients": [-1e39]}, r"ties: coefficient=-1e\+39 is not finite in float32"),
    ({"method": "consensus", "hparams": {"lam": 1e39}}, r"consensus: lam=1e\+39 is not finite in float32 .*use a smaller lam"),
    ({"method": "dare", "coefficients": [10**400]}, r"dare: coefficient=1000.* must be finite"),
])
def test_plan_entry_refuses_coefficients_beyond_float32(entry, pattern):
    with pytest.raises(MergeInputError, match=pattern):
        validate_plan_entry(entry, 2)


def test_plan_entry_accepts_ordinary_and_large_finite_coefficients():
    for c in (0.3, -0.5, 1.0, 3e38):  # 3e38 is finite in float32; whether λ·τ overflows is checked on the merge
        validate_plan_entry({"method": "task_arithmetic", "coefficients": [c]}, 2)
    validate_plan_entry({"method": "consensus", "hparams": {"lam": 0.4}, "coefficients": [0.3]}, 2)


def test_request_checks_coefficients_in_the_models_dtype(models, tmp_path):
    """fp16 models: λ = 1e5 is inf in float16 and refused; bf16 (max 3.4e38) accepts it; fp32 refuses 1e39 only."""
    fp16 = [_cast_copy(p, torch.float16, tmp_path / f"h{i}.safetensors") for i, p in enumerate(models)]
    bf16 = [_cast_copy(p, torch.bfloat16, tmp_path / f"b{i}.safetensors") for i, p in enumerate(models)]
    assert weights_dtype(fp16) == torch.float16 and weights_dtype(bf16) == torch.bfloat16
    assert weights_dtype(list(map(str, models))) == torch.float32
    with pytest.raises(MergeInputError, match=r"coefficient=100000\.0 is not finite in float16 \(\|value\| must be ≤ 6\.55e\+04"):
        validate_request(MergeEvalRequest(models=fp16, plan=[PlanEntry(coefficients=[1e5])]))
    validate_request(MergeEvalRequest(models=fp16, plan=[PlanEntry(coefficients=[0.3, 6e4])]))
    validate_request(MergeEvalRequest(models=bf16, plan=[PlanEntry(coefficients=[1e5])]))
    with pytest.raises(MergeInputError, match=r"coefficient=1e\+39 is not finite in float32"):
        validate_request(MergeEvalRequest(models=list(map(str, models)), plan=[{"method": "ties", "coefficients": [1e39]}]))


def test_request_checks_defense_strengths_in_the_models_dtype(models):
    from defenses import defense_setting

    inputs = {"clean": str(models[0]), "backdoored": str(models[1])}
    bad = defense_setting("ibvs", inputs, [1.0, 1e39], sources={"strengths": "--ibvs_alphas"})
    with pytest.raises(MergeInputError, match=r"--ibvs_alphas: strength=1e\+39 is not finite in float32"):
        validate_request(MergeEvalRequest(models=[str(models[0])], defenses=[bad]))
    validate_request(MergeEvalRequest(models=[str(models[0])], defenses=[defense_setting("ibvs", inputs, [0.5, 2.0])]))


def test_sweep_grid_refuses_coefficients_beyond_float32():
    from experiments.sweep import SweepError, _coefficients

    with pytest.raises(SweepError, match=r"grid\.coefficients: 1e\+39 is not finite in float32"):
        _coefficients("s.yaml", [0.3, 1e39])
    with pytest.raises(SweepError, match=r"grid\.coefficients: nan is not finite; give finite"):
        _coefficients("s.yaml", [float("nan")])
    assert _coefficients("s.yaml", [0, 0.3, 3e38]) == [0.0, 0.3, 3e38]


# -- 2. merged and defended weights finite before evaluation and export --
def test_first_non_finite():
    state = {"a": torch.ones(3), "i": torch.tensor([7]), "b": torch.tensor([1.0, float("inf")]), "c": torch.tensor([float("nan")])}
    assert first_non_finite(state) == "b"
    assert first_non_finite({"a": torch.ones(3, dtype=torch.bfloat16), "i": torch.tensor([7])}) is None


def _merge(models, tmp_path, session_cache, *extra) -> tuple[int, Path, Path]:
    out, export = tmp_path / "out", tmp_path / "merged.safetensors"
    rc = merge.main(["--models", *map(str, models), "--out_dir", str(out), "--cache_dir", session_cache,
                     "--individual", "false", "--zero_shot", "false", *extra])
    return rc, out, export


def test_overflowing_merge_is_never_exported(models, tmp_path, capsys, session_cache):
    """λ = 3e38 is finite in float32, but 3e38 · 5 is inf: refused with the method, λ and the key; no export."""
    rc, out, export = _merge(models, tmp_path, session_cache, "--coefficients", "3e38", "--evaluate", "false",
                             "--export", str(tmp_path / "merged.safetensors"))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert re.search(rf"merge\.py: error: task_arithmetic at coefficient=3e\+38: the merged weights are not finite "
                     rf"\(key '{re.escape(KEY)}' holds NaN or inf", err), err
    assert not export.exists() and not export.with_suffix(".json").exists()


def test_overflowing_merge_is_never_evaluated(models, tmp_path, capsys, session_cache):
    """With --select_on val the first merge that overflows stops the run: no row, no results."""
    rc, out, _ = _merge(models, tmp_path, session_cache, "--method", "ties", "--coefficients", "0.3", "3e38",
                        "--select_on", "val", "--eval_tasks", "shapes")
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "ties at coefficient=3e+38: the merged weights are not finite" in err, err
    assert not out.exists()


def test_overflowing_defense_is_never_evaluated(models, tmp_path, capsys, session_cache):
    """IBVS at α = 3e38 subtracts 3e38 · BV (BV = +5 on KEY): refused naming the merge, the defense and its strength."""
    rc, out, _ = _merge(models[:1], tmp_path, session_cache, "--coefficients", "0.3", "--eval_tasks", "shapes",
                        "--defense", "ibvs", "--ibvs_clean", str(models[0]), "--ibvs_backdoored", str(models[1]),
                        "--ibvs_alphas", "1", "3e38")
    err = capsys.readouterr().err
    assert rc == 2, err
    assert re.search(r"task_arithmetic at coefficient=0\.3 under ibvs strength 3e\+38: the merged weights are not "
                     r"finite \(key .* use a smaller strength", err), err
    assert not out.exists()


def test_finite_merge_still_evaluates(models, tmp_path, capsys, session_cache):
    rc, out, export = _merge(models, tmp_path, session_cache, "--coefficients", "0.3", "--eval_tasks", "shapes",
                             "--export", str(tmp_path / "merged.safetensors"))
    assert rc == 0, capsys.readouterr().err
    assert (out / "results.json").exists() and first_non_finite(load_state_dict(export)) is None


# -- 3. input weights too large for the forward pass --
def _with_weight(theta_pre: dict, value: float) -> dict:
    sd = {k: v.clone() for k, v in theta_pre.items()}
    sd[KEY].view(-1)[3] = value
    return sd


def test_weight_above_the_bound_is_refused_below_it_accepted(base, tmp_path):
    theta_pre = base.encoder_state_dict()
    pre_max = max(float(v.abs().max()) for v in theta_pre.values() if v.is_floating_point())
    bound = MAX_WEIGHT_SCALE * max(pre_max, 1.0)
    near, bad = tmp_path / "near.safetensors", tmp_path / "bad.safetensors"
    save_state_dict(near, _with_weight(theta_pre, -0.99 * bound))  # far beyond any fine-tune, still accepted
    save_state_dict(bad, _with_weight(theta_pre, 3e38))  # finite, but overflows the first matmul
    validate_inputs(theta_pre, [near])
    with pytest.raises(MergeInputError, match=rf"bad\.safetensors: key '{re.escape(KEY)}' holds a weight of magnitude "
                                              r"3e\+38, above the bound 1\.13e\+04 \(10000 × max\(largest \|θ_pre\| weight 1\.13, 1\)\)"):
        validate_inputs(theta_pre, [near, bad])
    over = tmp_path / "over.safetensors"
    save_state_dict(over, _with_weight(theta_pre, 1.01 * bound))
    with pytest.raises(MergeInputError, match="over.safetensors: .* the forward pass overflows"):
        validate_inputs(str(_pre_file(theta_pre, tmp_path)), [over])  # the streaming engine's path (θ_pre a file)


def _pre_file(theta_pre: dict, tmp_path: Path) -> Path:
    path = tmp_path / "pre.safetensors"
    save_state_dict(path, theta_pre)
    return path


def test_bound_grows_with_theta_pre_and_has_a_floor(tmp_path):
    """max(max|θ_pre|, 1): a θ_pre of tiny weights still admits moves of 1e4 - ε; a large one scales the bound."""
    tiny = {"w": torch.full((4,), 1e-3)}
    save_state_dict(tmp_path / "a.safetensors", {"w": torch.tensor([1e-3, 9.9e3, 0, 0])})
    validate_inputs(tiny, [tmp_path / "a.safetensors"])
    large = {"w": torch.full((4,), 100.0)}
    save_state_dict(tmp_path / "b.safetensors", {"w": torch.tensor([100.0, 9.9e5, 0, 0])})
    validate_inputs(large, [tmp_path / "b.safetensors"])
    save_state_dict(tmp_path / "c.safetensors", {"w": torch.tensor([100.0, 1.1e6, 0, 0])})
    with pytest.raises(MergeInputError, match=r"c\.safetensors: key 'w' holds a weight of magnitude 1\.1e\+06"):
        validate_inputs(large, [tmp_path / "c.safetensors"])
