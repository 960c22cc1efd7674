"""RegMean: Gram hooks against hand-computed XᵀX, and the merge against closed-form references."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from merging.io import MergeInputError
from merging.regmean import linear_input_grams, regmean_merge


def _linear_case(n_tasks=2, d_in=5, d_out=3, rows=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = {"weight": torch.randn(d_out, d_in, generator=g), "bias": torch.randn(d_out, generator=g),
           "steps": torch.tensor(7)}
    tuned = [{"weight": pre["weight"] + torch.randn(d_out, d_in, generator=g),
              "bias": pre["bias"] + torch.randn(d_out, generator=g), "steps": torch.tensor(9)} for _ in range(n_tasks)]
    xs = [torch.randn(rows, d_in, generator=g, dtype=torch.float64) * (1 + t) for t in range(n_tasks)]
    grams = [{"weight": (x.T @ x).float()} for x in xs]
    return pre, tuned, xs, grams


def test_alpha_one_is_least_squares():
    pre, tuned, xs, grams = _linear_case()
    merged = regmean_merge(pre, tuned, grams, alpha=1.0)
    # min_W Σ_t ||X_t Wᵀ − X_t W_tᵀ||²: one least-squares problem on the stacked rows
    x = torch.cat(xs)
    targets = torch.cat([xi @ t["weight"].double().T for xi, t in zip(xs, tuned)])
    reference = torch.linalg.lstsq(x, targets).solution.T
    torch.testing.assert_close(merged["weight"].double(), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged["bias"], (tuned[0]["bias"] + tuned[1]["bias"]) / 2)  # biases averaged
    assert merged["steps"].item() == 7  # non-float copied from pretrained


def test_diagonal_grams_with_identical_inputs_give_the_average():
    pre, tuned, xs, _ = _linear_case(n_tasks=3)
    gram = (xs[0].T @ xs[0]).float()
    merged = regmean_merge(pre, tuned, [{"weight": gram}] * 3, alpha=0.0)
    average = torch.stack([t["weight"] for t in tuned]).mean(0)
    torch.testing.assert_close(merged["weight"], average, atol=1e-5, rtol=1e-5)


def test_one_model_returns_it():
    pre, tuned, _, grams = _linear_case(n_tasks=1)
    merged = regmean_merge(pre, tuned, grams, alpha=0.1)
    torch.testing.assert_close(merged["weight"], tuned[0]["weight"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged["bias"], tuned[0]["bias"])


def test_singular_gram_keeps_average_on_unseen_inputs():
    pre, tuned, xs, _ = _linear_case()
    xs = [x.clone() for x in xs]
    for x in xs:
        x[:, 0] = 0  # input feature 0 never active: Σ G is singular
    grams = [{"weight": (x.T @ x).float()} for x in xs]
    merged = regmean_merge(pre, tuned, grams, alpha=1.0)
    average = (tuned[0]["weight"] + tuned[1]["weight"]) / 2
    torch.testing.assert_close(merged["weight"][:, 0], average[:, 0], atol=1e-5, rtol=1e-5)  # unseen: the mean
    x = torch.cat(xs)[:, 1:]  # seen features: least squares as with a regular Gram
    targets = torch.cat([xi @ t["weight"].double().T for xi, t in zip(xs, tuned)])
    reference = torch.linalg.lstsq(x, targets).solution.T
    torch.testing.assert_close(merged["weight"][:, 1:].double(), reference, atol=1e-5, rtol=1e-5)


def test_mismatches_raise_one_line_errors_naming_the_key():
    pre, tuned, _, grams = _linear_case()
    with pytest.raises(MergeInputError, match="'weight'"):
        regmean_merge(pre, tuned, [{"weight": torch.eye(4)}, grams[1]])
    bad = dict(tuned[1], weight=torch.zeros(2, 2))
    with pytest.raises(MergeInputError, match="fine-tuned model 1.*'weight'"):
        regmean_merge(pre, [tuned[0], bad], grams)
    with pytest.raises(MergeInputError, match="'nope'"):
        regmean_merge(pre, tuned, [grams[0], {"nope": torch.eye(5)}])
    with pytest.raises(MergeInputError, match="Gram dicts"):
        regmean_merge(pre, tuned, grams[:1])


def test_grams_of_a_sequential_match_hand_computation():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    batches = [torch.randn(3, 5, 4), torch.randn(2, 5, 4)]  # (B, T, d): tokens become rows
    grams = linear_input_grams(net, batches)
    assert set(grams) == {"0.weight", "2.weight"}
    x0 = torch.cat([b.reshape(-1, 4) for b in batches]).double()
    x2 = torch.relu(net[0](x0.float())).double()
    torch.testing.assert_close(grams["0.weight"], (x0.T @ x0).float())
    torch.testing.assert_close(grams["2.weight"], (x2.T @ x2).float(), atol=1e-5, rtol=1e-5)
    assert grams.rows == {"0.weight": 25, "2.weight": 25}
    only = linear_input_grams(net, batches, layer_names=["2"])
    assert set(only) == {"2.weight"}
    with pytest.raises(MergeInputError, match="'missing'"):
        linear_input_grams(net, batches, layer_names=["missing"])


def test_grams_of_the_embedded_first_resblock(base):
    encoder = base.model.visual
    block = encoder.transformer.resblocks[0]
    captured = []
    handle = block.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
    x = torch.randn(2, 3, base.image_size, base.image_size, generator=torch.Generator().manual_seed(0))
    try:
        grams = linear_input_grams(encoder, [x])
    finally:
        handle.remove()
    h = captured[0]  # block input, (B, L, D) batch-first
    prefix = "transformer.resblocks.0."
    with torch.no_grad():
        a = block.ln_1(h)
        attn = block.attn
        d, heads = attn.embed_dim, attn.num_heads
        q, k, v = F.linear(a, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
        weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / (d // heads) ** 0.5, dim=-1)
        z = (weights @ split(v)).transpose(1, 2).reshape_as(a)
        h1 = h + F.linear(z, attn.out_proj.weight, attn.out_proj.bias)
        m = block.ln_2(h1)
    for key, rows in (("attn.in_proj_weight", a), ("attn.out_proj.weight", z), ("mlp.c_fc.weight", m)):
        r = rows.reshape(-1, rows.shape[-1]).double()
        torch.testing.assert_close(grams[prefix + key], (r.T @ r).float(), atol=1e-4, rtol=1e-4)
        assert grams.rows[prefix + key] == r.shape[0]
    # covered: 4 blocks x (in_proj, out_proj, c_fc, c_proj); conv1 and proj are not linear modules
    assert len(grams) == 16 and "conv1.weight" not in grams and "proj" not in grams
