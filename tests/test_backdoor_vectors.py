"""Backdoor Vectors, SBV, SBV_SC and IBVS against small obviously-correct references written here."""

import math

import pytest
import torch

from merging.backdoor_vectors import (backdoor_vector, block_of, combine_vectors, cosine_similarity, ibvs_defend,
                                      inject, injection_vector, matching_keys, project_out, sign_consistent_mask,
                                      similarity_matrix, sparse_backdoor_vector, sparsify_top_k)
from merging.io import MergeInputError


def _state(seed: int, scale: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv1.weight": scale * torch.randn(4, 3, 2, 2, generator=g),
        "transformer.resblocks.0.attn.in_proj_weight": scale * torch.randn(6, 2, generator=g),
        "transformer.resblocks.0.mlp.c_fc.bias": scale * torch.randn(5, generator=g),
        "transformer.resblocks.1.mlp.c_fc.weight": scale * torch.randn(3, 3, generator=g),
        "ln_post.weight": scale * torch.randn(7, generator=g),
        "counter": torch.tensor([3], dtype=torch.long),  # an int buffer: not part of a BV
    }


def _flat(v: dict) -> list[float]:
    return [x for k in sorted(v) for x in v[k].flatten().tolist()]


def test_bv_of_identical_runs_is_zero():
    clean = _state(0)
    bv = backdoor_vector({k: t.clone() for k, t in clean.items()}, clean)
    assert set(bv) == {k for k, t in clean.items() if t.is_floating_point()}
    assert all(float(t.abs().max()) == 0.0 for t in bv.values())


def test_adding_the_bv_to_the_clean_model_reproduces_the_backdoored_weights():
    clean, bd = _state(0), _state(1)
    bd["counter"] = clean["counter"].clone()
    restored = inject(clean, backdoor_vector(bd, clean), 1.0)
    for key in clean:
        assert torch.allclose(restored[key], bd[key], atol=1e-6), key
        assert restored[key].dtype == bd[key].dtype


def test_bv_refuses_mismatched_states():
    clean, bd = _state(0), _state(1)
    bd["ln_post.weight"] = torch.zeros(8)
    with pytest.raises(MergeInputError, match="ln_post.weight"):
        backdoor_vector(bd, clean)


def test_cosine_similarity_matches_a_plain_reference():
    a, b = backdoor_vector(_state(1), _state(0)), backdoor_vector(_state(2), _state(0))
    x, y = _flat(a), _flat(b)
    ref = sum(p * q for p, q in zip(x, y)) / math.sqrt(sum(p * p for p in x) * sum(q * q for q in y))
    assert cosine_similarity(a, b) == pytest.approx(ref, abs=1e-9)
    assert cosine_similarity(a, a) == pytest.approx(1.0)
    neg = {k: -v for k, v in a.items()}
    assert cosine_similarity(a, neg) == pytest.approx(-1.0)
    zero = {k: torch.zeros_like(v) for k, v in a.items()}
    assert cosine_similarity(a, zero) == 0.0


def test_per_block_cosine_groups_by_block():
    assert block_of("transformer.resblocks.3.attn.in_proj_weight") == "transformer.resblocks.3"
    assert block_of("conv1.weight") == "conv1"
    a, b = backdoor_vector(_state(1), _state(0)), backdoor_vector(_state(2), _state(0))
    per = cosine_similarity(a, b, per_block=True)
    assert set(per) == {"conv1", "transformer.resblocks.0", "transformer.resblocks.1", "ln_post"}
    keys = ["transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.0.mlp.c_fc.bias"]
    x = [v for k in keys for v in a[k].flatten().tolist()]
    y = [v for k in keys for v in b[k].flatten().tolist()]
    ref = sum(p * q for p, q in zip(x, y)) / math.sqrt(sum(p * p for p in x) * sum(q * q for q in y))
    assert per["transformer.resblocks.0"] == pytest.approx(ref, abs=1e-9)
    matrix = similarity_matrix([a, b, a])
    assert matrix.shape == (3, 3)
    assert matrix[0, 2] == pytest.approx(1.0) and matrix[0, 1] == pytest.approx(per_all := cosine_similarity(a, b))
    assert matrix[1, 0] == pytest.approx(per_all)
    blocks = similarity_matrix([a, b], per_block=True)
    assert blocks["transformer.resblocks.0"][0, 1] == pytest.approx(ref, abs=1e-9)


def _vectors():
    return [
        {"w": torch.tensor([1.0, -2.0, 3.0, 0.5, -0.1, 0.0]), "b": torch.tensor([[1.0, 2.0], [-3.0, 4.0]])},
        {"w": torch.tensor([2.0, 1.0, 1.0, -0.5, -0.2, 1.0]), "b": torch.tensor([[0.5, -2.0], [-1.0, 4.0]])},
        {"w": torch.tensor([0.5, -1.0, -4.0, 0.5, -0.3, 2.0]), "b": torch.tensor([[2.0, 2.0], [-2.0, -1.0]])},
    ]


def test_combine_sum_mean_and_sign_election():
    vs = _vectors()
    assert torch.equal(combine_vectors(vs, "sum")["w"], vs[0]["w"] + vs[1]["w"] + vs[2]["w"])
    assert torch.allclose(combine_vectors(vs, "mean")["b"], (vs[0]["b"] + vs[1]["b"] + vs[2]["b"]) / 3)
    elected = combine_vectors(vs, "elect")["w"].tolist()
    for i in range(6):  # reference: elect the sign of the sum, average the agreeing entries
        column = [v["w"][i].item() for v in vs]
        total = sum(column)
        sign = (total > 0) - (total < 0)
        agree = [c for c in column if sign != 0 and ((c > 0) - (c < 0)) == sign]
        assert elected[i] == pytest.approx(sum(agree) / len(agree) if agree else 0.0)
    with pytest.raises(MergeInputError, match="combine method"):
        combine_vectors(vs, "median")


@pytest.mark.parametrize("k", [10, 25, 50, 100, 33.3])
def test_sparsify_keeps_exactly_k_percent_of_the_largest_entries(k):
    g = torch.Generator().manual_seed(0)
    v = {"a": torch.randn(40, generator=g), "b": torch.randn(10, 3, generator=g)}
    out = sparsify_top_k(v, k)
    for key, t in v.items():
        n = t.numel()
        keep = round(k / 100 * n)
        kept = out[key] != 0
        assert int(kept.sum()) == keep
        magnitudes = sorted(t.abs().flatten().tolist(), reverse=True)
        threshold = magnitudes[keep - 1]
        assert all(abs(x) >= threshold for x in t.flatten()[kept.flatten()].tolist())  # the largest ones
        assert torch.equal(out[key][kept], t[kept])  # values unchanged
    glob = sparsify_top_k(v, k, scope="global")
    total = sum(t.numel() for t in v.values())
    assert sum(int((t != 0).sum()) for t in glob.values()) == round(k / 100 * total)


@pytest.mark.parametrize("k", [0, -5, 100.5, float("nan")])
def test_sparsify_refuses_k_outside_0_100(k):
    with pytest.raises(MergeInputError, match=r"\(0, 100\]"):
        sparsify_top_k({"a": torch.ones(3)}, k)


def test_sign_consistent_keeps_only_entries_where_all_bvs_agree():
    vs = _vectors()
    mask = sign_consistent_mask(vs)
    for key in ("w", "b"):
        flat = [v[key].flatten().tolist() for v in vs]
        ref = [all(x > 0 for x in col) or all(x < 0 for x in col) for col in zip(*flat)]
        assert mask[key].flatten().tolist() == ref
    sc = sparse_backdoor_vector(vs, "sum", 100, sign_consistent=True)
    for key in ("w", "b"):
        total = vs[0][key] + vs[1][key] + vs[2][key]
        assert torch.equal(sc[key], total * mask[key])
    # w: only entries 0 (1, 2, .5) and 4 (-.1, -.2, -.3) agree in sign across the three vectors
    assert mask["w"].tolist() == [True, False, False, False, True, False]


def test_sbv_sparsifies_the_combination():
    vs = _vectors()
    out = sparse_backdoor_vector(vs, "mean", 50)
    ref = sparsify_top_k(combine_vectors(vs, "mean"), 50)
    for key in out:
        assert torch.equal(out[key], ref[key])


def test_ibvs_with_alpha_zero_is_the_identity_and_subtracts_otherwise():
    merged, bv = _state(3), backdoor_vector(_state(1), _state(0))
    same = ibvs_defend(merged, bv, 0.0)
    for key in merged:
        assert torch.equal(same[key], merged[key])
    out = ibvs_defend(merged, bv, 0.5)
    for key in bv:
        assert torch.allclose(out[key], merged[key] - 0.5 * bv[key], atol=1e-6)
    assert torch.equal(out["counter"], merged["counter"])
    with pytest.raises(MergeInputError, match="alpha"):
        ibvs_defend(merged, bv, float("nan"))


# -- IBVS options (issue 16): BV_inj = topk(restrict(project_out(combine(BV_1 … BV_K)))) ------------------------------
def _float_state(seed: int) -> dict:
    return {k: v for k, v in _state(seed).items() if v.is_floating_point()}


def test_project_out_removes_the_component_along_the_direction_per_tensor():
    v = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "c": torch.tensor([5.0])}
    u = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([[0.0, 1.0], [1.0, 0.0]]), "c": torch.tensor([0.0])}
    out = project_out(v, u)
    assert out["a"].tolist() == [0.0, 4.0]  # (3, 4) minus its x component
    # b: ⟨v, u⟩ = 2 + 3 = 5, ⟨u, u⟩ = 2: v − 2.5·u
    assert torch.allclose(out["b"], torch.tensor([[1.0, -0.5], [0.5, 4.0]]))
    assert out["c"].tolist() == [5.0]  # a zero direction leaves the tensor as it is
    g = torch.Generator().manual_seed(0)
    v, u = {"x": torch.randn(5, 4, generator=g)}, {"x": torch.randn(5, 4, generator=g)}
    assert abs(float((project_out(v, u)["x"] * u["x"]).sum())) < 1e-5  # orthogonal to u, tensor by tensor
    with pytest.raises(MergeInputError, match="not shared"):
        project_out(v, {"y": u["x"]})


def test_matching_keys_takes_key_or_block_globs_and_refuses_a_pattern_that_matches_nothing():
    keys = list(_float_state(0))
    assert matching_keys(keys, ["transformer.resblocks.0"]) == [
        "transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.0.mlp.c_fc.bias"]
    assert matching_keys(keys, ["*.mlp.*"]) == ["transformer.resblocks.0.mlp.c_fc.bias",
                                                "transformer.resblocks.1.mlp.c_fc.weight"]
    assert matching_keys(keys, ["transformer.resblocks.[01]", "ln_post"]) == keys[1:]
    with pytest.raises(MergeInputError, match=r"restrict pattern 'transformer\.resblocks\.7' matches no key"):
        matching_keys(keys, ["transformer.resblocks.0", "transformer.resblocks.7"])


def test_injection_vector_of_one_bv_with_no_option_is_that_bv():
    bv = backdoor_vector(_float_state(1), _float_state(0))
    out = injection_vector([bv])
    assert all(torch.equal(out[k], bv[k]) for k in bv)


def test_injection_vector_combines_projects_restricts_and_keeps_the_top_k():
    bvs = [backdoor_vector(_float_state(s), _float_state(0)) for s in (1, 2, 3)]
    direction = backdoor_vector(_float_state(4), _float_state(0))
    keys = list(bvs[0])
    mean = {k: (bvs[0][k] + bvs[1][k] + bvs[2][k]) / 3 for k in keys}
    total = {k: bvs[0][k] + bvs[1][k] + bvs[2][k] for k in keys}
    for k in keys:
        assert torch.allclose(injection_vector(bvs, "mean")[k], mean[k], atol=1e-6)
        assert torch.allclose(injection_vector(bvs, "sum")[k], total[k], atol=1e-6)
    # reference of the whole chain, written out: project (per tensor), keep two blocks, then top-30% per tensor
    projected = {}
    for k in keys:
        v, u = mean[k].double().flatten(), direction[k].double().flatten()
        projected[k] = (v - (v @ u) / (u @ u) * u).view_as(mean[k]).float()
    kept = ["transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.0.mlp.c_fc.bias", "ln_post.weight"]
    out = injection_vector(bvs, "mean", direction, ["transformer.resblocks.0", "ln_post"], 30, "tensor")
    for k in keys:
        if k not in kept:
            assert not out[k].any(), k
            continue
        flat = projected[k].flatten()
        n_keep = round(0.3 * flat.numel())
        top = set(sorted(range(flat.numel()), key=lambda i: -abs(float(flat[i])))[:n_keep])
        ref = torch.tensor([float(flat[i]) if i in top else 0.0 for i in range(flat.numel())]).view_as(projected[k])
        assert torch.allclose(out[k], ref, atol=1e-6), k


def test_injection_vector_global_top_k_ranks_only_the_restricted_keys():
    bv = backdoor_vector(_float_state(1), _float_state(0))
    bv["conv1.weight"] = 100 * bv["conv1.weight"]  # the largest entries, but outside the restriction
    out = injection_vector([bv], restrict=["*.mlp.*"], topk=50, scope="global")
    assert not out["conv1.weight"].any()
    restricted = torch.cat([bv[k].flatten() for k in ("transformer.resblocks.0.mlp.c_fc.bias",
                                                      "transformer.resblocks.1.mlp.c_fc.weight")])
    n_keep = round(0.5 * restricted.numel())
    threshold = sorted(restricted.abs().tolist(), reverse=True)[n_keep - 1]
    kept = [float(x) for k in ("transformer.resblocks.0.mlp.c_fc.bias", "transformer.resblocks.1.mlp.c_fc.weight")
            for x in out[k].flatten() if x != 0]
    assert len(kept) == n_keep and all(abs(x) >= threshold for x in kept)
