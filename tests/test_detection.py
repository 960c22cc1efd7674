"""Detection before merging (merging/detection.py, bv.py detect): the ROC AUC and the label-free flag rule against
hand-computed examples, and a planted backdoor (clean + c·BV) that must outscore clean models and be dropped."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

import bv
from merging.backdoor_vectors import block_of
from merging.detection import flag_outliers, model_score, modified_z_scores, roc_auc
from merging.io import MergeInputError, save_state_dict


def test_roc_auc_matches_a_hand_computed_example():
    # backdoored 0.9, 0.3, 0.5; clean 0.8, 0.5. Pairs (bd, clean): 0.9>0.8 ✓, 0.9>0.5 ✓, 0.3<0.8, 0.3<0.5,
    # 0.5<0.8, 0.5=0.5 (½): 2.5 of 6.
    assert roc_auc([0.9, 0.8, 0.3, 0.5, 0.5], [True, False, True, False, True]) == pytest.approx(2.5 / 6)
    assert roc_auc([0.2, 0.9], [False, True]) == 1.0 and roc_auc([0.2, 0.9], [True, False]) == 0.0
    with pytest.raises(MergeInputError, match="needs backdoored and clean models"):
        roc_auc([0.1, 0.2], [True, True])
    with pytest.raises(MergeInputError, match="2 scores for 3 labels"):
        roc_auc([0.1, 0.2], [True, False, True])


def test_modified_z_scores_and_flags_match_hand_computed_values():
    # median 3, |deviations| 2, 1, 0, 1, 97 -> MAD 1: z = 0.6745·(s − 3)
    z = modified_z_scores([1, 2, 3, 4, 100])
    assert z == pytest.approx([-1.349, -0.6745, 0.0, 0.6745, 65.4265])
    assert flag_outliers([1, 2, 3, 4, 100]) == [False, False, False, False, True]
    assert flag_outliers([-100, 1, 2, 3, 4]) == [False] * 5  # one-sided: a low score is no evidence of a backdoor
    # MAD 0 (most scores equal): (s − median) / (1.2533·mean |deviation|); 0.2 mean deviation -> z(1) = 3.99
    assert modified_z_scores([0, 0, 0, 0, 1])[-1] == pytest.approx(1 / (1.253314 * 0.2))
    assert flag_outliers([0, 0, 0, 0, 1]) == [False, False, False, False, True]
    assert flag_outliers([0, 0, 0, 1]) == [False] * 4  # z = 1 / (1.2533·0.25) = 3.19 ≤ 3.5
    assert flag_outliers([0.5, 0.5, 0.5]) == [False] * 3 and modified_z_scores([]) == []
    # even count: the median is the mean of the middle two (2.5), MAD = median(1.5, 0.5, 0.5, 97.5) = 1
    assert modified_z_scores([1, 2, 3, 100])[3] == pytest.approx(0.6745 * 97.5)


def _planted(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"conv1.weight": (8, 3, 2, 2), "transformer.resblocks.0.attn.in_proj_weight": (12, 4),
              "transformer.resblocks.1.mlp.c_fc.weight": (6, 6), "ln_post.weight": (9,)}
    bv_ = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    cleans = [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(4)]
    return bv_, cleans


@pytest.mark.parametrize("aggregate", ["mean", "max", "whole"])
def test_a_planted_backdoor_outscores_every_clean_model(aggregate):
    bv_, cleans = _planted()
    planted = {k: cleans[0][k] + 0.8 * bv_[k] for k in bv_}  # τ = τ_clean + c·BV
    other = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(9)) for k, v in bv_.items()}
    scores = [model_score(tv, [other, bv_], aggregate)[0] for tv in [planted, *cleans]]
    assert scores[0] > max(scores[1:])
    labels = [True, False, False, False, False]
    assert roc_auc(scores, labels) == 1.0
    score, blocks = model_score(planted, [other, bv_], aggregate)
    assert set(blocks) == {block_of(k) for k in bv_}
    if aggregate == "mean":  # the reference: the mean over blocks of the per-block cosine with the best BV
        ref = []
        for k in bv_:
            a, b = planted[k].flatten(), bv_[k].flatten()
            ref.append(float(a @ b / (a.norm() * b.norm())))
        assert score == pytest.approx(sum(ref) / len(ref), rel=1e-5)
    with pytest.raises(MergeInputError, match="aggregate='median' is unknown"):
        model_score(planted, [bv_], "median")


def test_projecting_out_the_defenders_clean_task_vector_removes_the_task_from_the_score():
    """A clean model of the defender's task (τ ∝ τ_c) and a BV that points against τ_c: the raw score is driven by the
    task (that clean model scores lowest); with τ_c projected out of both, per tensor, the planted backdoor wins."""
    bv_, cleans = _planted(1)
    tau_c = cleans[0]
    inj = {k: bv_[k] - 0.9 * tau_c[k] for k in bv_}                 # the defender's BV: shared part − τ_c
    same_task_clean = {k: 1.1 * tau_c[k] for k in bv_}
    attack = {k: 0.6 * tau_c[k] + 0.7 * bv_[k] for k in bv_}          # learns less of the task, plus the backdoor
    others = cleans[1:]
    raw = [model_score(t, [inj])[0] for t in [attack, same_task_clean, *others]]
    projected = [model_score(t, [inj], references=[tau_c])[0] for t in [attack, same_task_clean, *others]]
    assert raw[1] < min(raw[2:])                                       # the task alone drives the raw score down
    assert projected[0] > max(projected[1:]) and roc_auc(projected, [True, False, False, False, False]) == 1.0
    ref = []                                                           # the reference: per tensor, by hand
    for k in bv_:
        u = tau_c[k].flatten().double()
        a, v = attack[k].flatten().double(), inj[k].flatten().double()
        a, v = a - (a @ u) / (u @ u) * u, v - (v @ u) / (u @ u) * u
        ref.append(float(a @ v / (a.norm() * v.norm())))
    assert projected[0] == pytest.approx(sum(ref) / len(ref), rel=1e-5)
    with pytest.raises(MergeInputError, match="2 reference task vectors for 1 backdoor vectors"):
        model_score(attack, [inj], references=[tau_c, tau_c])


# -- bv.py detect on exported models --------------------------------------------------------------------------------
def _export(path, base, state, task):
    save_state_dict(path, state, {"kind": "finetune", "task": task, "base_model": base.describe(), "attack": None})
    return str(path)


@pytest.fixture(scope="module")
def detect_inputs(tmp_path_factory, base):
    """θ_pre + small random task vectors on the four tasks (clean), a shapes model + 3·BV (planted), and the
    defender's pair: a clean shapes model and the same + BV."""
    root = tmp_path_factory.mktemp("detect")
    theta = base.encoder_state_dict()

    def noise(seed, scale=0.005):
        g = torch.Generator().manual_seed(seed)
        return {k: scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else torch.zeros_like(v)
                for k, v in theta.items()}

    bv_ = noise(100)
    files = {}
    for i, task in enumerate(("shapes", "digits", "textures", "colours")):
        files[task] = _export(root / f"{task}.safetensors", base, {k: theta[k] + noise(i)[k] for k in theta}, task)
    files["planted"] = _export(root / "planted.safetensors", base,
                               {k: theta[k] + noise(10)[k] + 3 * bv_[k] for k in theta}, "shapes")
    files["def_clean"] = _export(root / "def_clean.safetensors", base, {k: theta[k] + noise(20)[k] for k in theta},
                                 "shapes")
    files["def_bd"] = _export(root / "def_bd.safetensors", base,
                              {k: theta[k] + noise(20)[k] + bv_[k] for k in theta}, "shapes")
    return root, files


def _argv(out, cache, files, merges, extra=()):
    models = [{"path": files[n], "backdoored": n == "planted"} for n in ("shapes", "digits", "textures", "colours", "planted")]
    return ["detect", "--out_dir", str(out), "--cache_dir", cache, "--device", "cpu", "--synthetic_train_size", "200",
            "--synthetic_test_size", "40", "--defender", json.dumps({"clean": files["def_clean"], "backdoored": [files["def_bd"]]}),
            "--detect_models", json.dumps(models), "--detect_merges", json.dumps(merges), *extra]


def test_detect_scores_flags_and_merges_without_the_flagged_model(detect_inputs, session_cache):
    root, files = detect_inputs
    merges = [{"name": "attacked", "models": [files[n] for n in ("planted", "digits", "textures", "colours")]},
              {"name": "clean", "models": [files[n] for n in ("shapes", "digits", "textures", "colours")]}]
    out = root / "out"
    path = bv.main(_argv(out, session_cache, files, merges))
    res = json.loads(path.read_text())
    assert res["roc_auc"] == 1.0 and set(res["roc_auc_per_block"]) and "modified z-score" in res["rule"]
    by_path = {m["path"]: m for m in res["models"]}
    planted = by_path[files["planted"]]
    assert planted["score"] > max(m["score"] for p, m in by_path.items() if p != files["planted"])
    assert planted["flagged"] and not any(m["flagged"] for p, m in by_path.items() if p != files["planted"])
    assert res["flags_over_all_models"] == {"true_positive": 1, "false_positive": 0, "false_negative": 0,
                                            "true_negative": 4}
    attacked, clean = res["merges"]
    assert attacked["dropped"] == [files["planted"]] and attacked["flagged"] == [True, False, False, False]
    assert attacked["all"][0]["models"] == attacked["models"] and attacked["filtered"][0]["models"] == attacked["models"][1:]
    for summary in (attacked["all"][0], attacked["filtered"][0]):  # every task measured, the dropped one too
        assert summary["merge"] == "task_arithmetic" and summary["coefficient"] == 0.3
        assert set(summary["clean_acc"]) == {"shapes", "digits", "textures", "colours"}
    assert clean["dropped"] == [] and clean["filtered"] == clean["all"]  # nothing flagged: the same merge
    table = list(csv.reader((out / "detection.csv").open()))
    assert table[0][:6] == ["model", "task", "backdoored", "score", "z", "flagged"] and len(table) == 6
    assert math.isclose(float(next(r for r in table if r[0] == files["planted"])[3]), planted["score"], rel_tol=1e-5)


def test_detect_refuses_bad_input_in_one_line_before_any_work(detect_inputs, tmp_path, capsys, monkeypatch):
    from evaluation import merge_eval

    _, files = detect_inputs
    monkeypatch.setattr(merge_eval.EvalCache, "base", lambda *a: (_ for _ in ()).throw(AssertionError("loaded")))
    out = tmp_path / "out"
    good = [{"name": "m", "models": [files["digits"], files["planted"]]}]
    cases = {
        "--detect_aggregate='median'; use one of mean, max, whole": _argv(out, "c", files, good, ["--detect_aggregate", "median"]),
        "--detect_threshold=0.0 must be a finite number > 0": _argv(out, "c", files, good, ["--detect_threshold", "0"]),
        f"detect_merges: m: {tmp_path}/x.safetensors is not one of detect_models": _argv(
            out, "c", files, [{"name": "m", "models": [files["digits"], str(tmp_path / "x.safetensors")]}]),
        "detect_plan: unknown merge method 'fisher'": _argv(out, "c", files, good,
                                                            ["--detect_plan", json.dumps([{"method": "fisher"}])]),
        "defender.clean: 2 clean models for 1 backdoored ones": [
            *_argv(out, "c", files, good)[:-6], "--defender",
            json.dumps({"clean": [files["def_clean"], files["shapes"]], "backdoored": [files["def_bd"]]}),
            *_argv(out, "c", files, good)[-4:]],
        "detect_models: nope.safetensors does not exist": [
            *_argv(out, "c", files, [])[:-4], "--detect_models", json.dumps([{"path": "nope.safetensors"}]),
            "--detect_merges", "[]"],
    }
    for message, argv in cases.items():
        assert bv.cli_main(argv) == 2, message
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("bv.py: error: ") and message in err, err
    assert not out.exists()


def test_shipped_detect_config_parses_with_every_model_labelled():
    cfg = bv.build_parser().parse_args(["detect", "--config", "configs/bv/embedded_detect.yaml"])
    assert cfg.detect_threshold == 3.5 and cfg.detect_aggregate == "mean" and len(cfg.defender["backdoored"]) == 1
    paths = [m["path"] for m in cfg.detect_models]
    assert len(paths) == len(set(paths)) and all(isinstance(m["backdoored"], bool) for m in cfg.detect_models)
    assert all(p in paths for g in cfg.detect_merges for p in g["models"])  # every merged model is scored
    assert cfg.defender["clean"] not in paths  # the defender's own clean model is not an incoming one
