"""IBVS variants (issue 16): every option of the one ``ibvs`` defense against a reference written here, the variant
spec (shares the main job's trainings, keys of its configurations), and a quick run of it through ``bv.py variants``
whose strength selection sees no attacker data."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import bv
from defenses import defense_setting
from experiments.graph import RunOptions, build_graph
from experiments.spec import load_spec, parse_spec
from merging.io import MergeInputError, save_state_dict

SPEC = "configs/experiments/ibvs_variants.yaml"
MAIN = "configs/experiments/embedded.yaml"


# -- the defense's options against references ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair_files(tmp_path_factory, base):
    """θ_pre plus small random changes, exported as train.py would: clean_a, clean_b, bd_1, bd_2 (shapes), merged."""
    root = tmp_path_factory.mktemp("ibvs_models")
    theta = base.encoder_state_dict()
    out = {}
    for i, name in enumerate(("clean_a", "clean_b", "bd_1", "bd_2", "merged")):
        g = torch.Generator().manual_seed(10 + i)
        sd = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in theta.items()}
        path = root / f"{name}.safetensors"
        save_state_dict(path, sd, {"kind": "finetune", "task": "shapes", "base_model": base.describe(), "attack": None})
        out[name] = (str(path), sd)
    return out, theta


def _defended(pair_files, base, inputs: dict, init_args: dict | None, alpha: float = 0.5):
    files, theta = pair_files
    paths = {k: [files[x][0] for x in v] if isinstance(v, list) else files[v][0] for k, v in inputs.items()}
    setting = defense_setting("ibvs", paths, strengths=[alpha], init_args=init_args)
    setting.defense.validate(setting)
    setting.defense.prepare(SimpleNamespace(base=base, theta_pre=theta), dict(setting.inputs))
    merged = files["merged"][1]
    return setting, merged, setting.defense.apply(merged, alpha)


def _bv(files, bd, clean):
    return {k: files[bd][1][k] - files[clean][1][k] for k in files[bd][1] if files[bd][1][k].is_floating_point()}


def _check(merged, out, vector, alpha):
    for key, v in vector.items():
        assert torch.allclose(out[key], merged[key] - alpha * v, atol=1e-6), key
    for key in merged:
        if key not in vector:
            assert torch.equal(out[key], merged[key])


def test_mean_of_several_backdoored_models_against_one_clean(pair_files, base):
    files, _ = pair_files
    _, merged, out = _defended(pair_files, base, {"clean": "clean_a", "backdoored": ["bd_1", "bd_2"]}, None)
    b1, b2 = _bv(files, "bd_1", "clean_a"), _bv(files, "bd_2", "clean_a")
    _check(merged, out, {k: (b1[k] + b2[k]) / 2 for k in b1}, 0.5)


def test_sum_of_pairs_takes_each_backdoored_model_with_its_own_clean(pair_files, base):
    files, _ = pair_files
    _, merged, out = _defended(pair_files, base, {"clean": ["clean_a", "clean_b"], "backdoored": ["bd_1", "bd_2"]},
                               {"combine": "sum"}, alpha=0.25)
    b1, b2 = _bv(files, "bd_1", "clean_a"), _bv(files, "bd_2", "clean_b")
    _check(merged, out, {k: b1[k] + b2[k] for k in b1}, 0.25)


def test_one_pair_without_options_is_the_plain_defense(pair_files, base):
    files, _ = pair_files
    setting, merged, out = _defended(pair_files, base, {"clean": "clean_a", "backdoored": "bd_1"}, None)
    _check(merged, out, _bv(files, "bd_1", "clean_a"), 0.5)
    same = setting.defense.apply(merged, 0.0)
    assert all(torch.equal(same[k], merged[k]) for k in merged)
    assert setting.defense.describe(0.5, setting.inputs) == {"name": "ibvs", "alpha": 0.5, **setting.inputs}


def test_restrict_subtracts_only_on_the_matching_blocks(pair_files, base):
    files, _ = pair_files
    setting, merged, out = _defended(pair_files, base, {"clean": "clean_a", "backdoored": "bd_1"},
                                     {"restrict": ["transformer.resblocks.0", "*.mlp.*"]})
    full = _bv(files, "bd_1", "clean_a")
    inside = {k for k in full if k.startswith("transformer.resblocks.0.") or ".mlp." in k}
    assert inside and len(inside) < len(full)
    _check(merged, out, {k: full[k] if k in inside else torch.zeros_like(full[k]) for k in full}, 0.5)
    assert setting.defense.describe(0.5, {})["restrict"] == ["transformer.resblocks.0", "*.mlp.*"]


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_topk_subtracts_the_largest_entries_only(pair_files, base, scope):
    files, _ = pair_files
    _, merged, out = _defended(pair_files, base, {"clean": "clean_a", "backdoored": "bd_1"},
                               {"topk": 10, "topk_scope": scope}, alpha=1.0)
    full = _bv(files, "bd_1", "clean_a")
    changed = {k: (out[k] != merged[k]) for k in full}
    if scope == "tensor":
        for k, mask in changed.items():
            assert int(mask.sum()) == round(0.1 * full[k].numel()), k
    else:
        n = sum(v.numel() for v in full.values())
        assert sum(int(m.sum()) for m in changed.values()) == round(0.1 * n)
        threshold = sorted(torch.cat([v.abs().flatten() for v in full.values()]).tolist(), reverse=True)[round(0.1 * n) - 1]
        assert all(float(full[k][m].abs().min()) >= threshold for k, m in changed.items() if m.any())


@pytest.mark.parametrize("project", ["merged", "defender_clean"])
def test_project_out_spares_the_direction_of_the_clean_task_vectors(pair_files, base, project):
    files, theta = pair_files
    setting, merged, out = _defended(pair_files, base, {"clean": "clean_a", "backdoored": "bd_1"},
                                     {"project_out": project})
    full = _bv(files, "bd_1", "clean_a")
    source = merged if project == "merged" else files["clean_a"][1]
    used = setting.defense.injection_vector(merged)
    ref = {}
    for k, v in full.items():  # the reference: per tensor, v minus its projection on u
        u = (source[k] - theta[k]).double().flatten()
        x = v.double().flatten()
        ref[k] = (x - (x @ u) / (u @ u) * u).view_as(v).float()
        w = used[k].double().flatten()
        assert abs(float(w @ u)) <= 1e-5 * float(u.norm()) * float(w.norm()) + 1e-12, k  # orthogonal to u
    _check(merged, out, ref, 0.5)


@pytest.mark.parametrize("init_args, message", [
    ({"combine": "median"}, "ibvs: combine='median' is unknown; use one of sum, mean, elect"),
    ({"topk": 0}, "ibvs: topk=0 must be a percentage in (0, 100] of |BV_inj| kept, e.g. 10"),
    ({"topk_scope": "block"}, "ibvs: topk_scope='block' is unknown; use tensor or global"),
    ({"project_out": "attacker"}, "ibvs: project_out='attacker' is unknown; use merged, defender_clean or null"),
    ({"restrict": "transformer.resblocks.0"}, "ibvs: restrict='transformer.resblocks.0' must be a non-empty list"),
    ({"nosuch": 1}, "bad init_args"),
])
def test_bad_options_are_refused_in_one_line(init_args, message):
    with pytest.raises(MergeInputError) as e:
        defense_setting("ibvs", {}, init_args=init_args)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_input_lists_are_refused_before_any_work(pair_files, base, tmp_path):
    files, theta = pair_files
    a, b1, b2 = files["clean_a"][0], files["bd_1"][0], files["bd_2"][0]
    cases = {
        "inputs.clean: 2 clean models for 3 backdoored ones; give one clean model (shared by all) or one per "
        "backdoored model, in the same order": {"clean": [a, a], "backdoored": [b1, b2, b1]},
        "inputs.backdoored is an empty list": {"clean": a, "backdoored": []},
        f"inputs.backdoored: {tmp_path}/nope.safetensors does not exist": {"clean": a,
                                                                           "backdoored": [b1, str(tmp_path / "nope.safetensors")]},
    }
    for message, inputs in cases.items():
        setting = defense_setting("ibvs", inputs)
        with pytest.raises(MergeInputError) as e:
            setting.defense.validate(setting)
        assert message in str(e.value), str(e.value)
    setting = defense_setting("ibvs", {"clean": a, "backdoored": [b1, b2]}, init_args={"restrict": ["mlp"]})
    setting.defense.validate(setting)
    with pytest.raises(MergeInputError, match=r"^restrict pattern 'mlp' matches no key or block"):
        setting.defense.prepare(SimpleNamespace(base=base, theta_pre=theta), dict(setting.inputs))


# -- the variant spec ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quick", [False, True])
def test_variant_spec_reuses_the_main_jobs_trainings_and_clean_evaluation(quick):
    options = RunOptions(out_dir="unused", quick=quick)
    main, variants = build_graph(load_spec(MAIN), options), build_graph(load_spec(SPEC), options)
    shared = [n for n in main if n.startswith(("train:", "vector:"))]
    assert shared and all(variants[n].key == main[n].key for n in shared)  # the cache hits: nothing retrained
    assert variants["evaluate:clean"].key == main["evaluate:clean"].key  # the ΔCA reference is not re-evaluated
    new = [n for n in variants if n.startswith("train:") and n not in main]
    assert len(new) == 9 + 4 + 2 + 2  # classes 1..9, 4 patches, the optimised trigger and its model, digits pair
    defenses = variants["evaluate:attacked:badnets"].recipe["defenses"]
    assert len(defenses) == 20 and len({d["name"] for d in defenses}) == 20
    k10 = next(d for d in defenses if d["name"] == "k10_mean")
    assert k10["label"] == "k10_mean" and len(k10["inputs"]["backdoored"]) == 10 and "init_args" not in k10
    assert next(d for d in defenses if d["name"] == "topk_10")["init_args"] == {"topk": 10}
    plain = next(d for d in defenses if d["name"] == "ibvs")
    assert "label" not in plain and "init_args" not in plain  # the main job's defense keeps its recipe (and keys)
    deps = set(variants["evaluate:attacked:badnets"].deps)
    needed = {f"train:ibvs_bd_shapes_c{c}" for c in range(1, 10)} | {"train:bv_clean_digits", "train:ibvs_bd_digits"}
    assert needed <= deps
    assert variants["train:ibvs_bd_shapes_opt"].deps == ["train:ibvs_trigger_shapes"]


def _quick_spec(tmp_path: Path, keep: list[str]) -> Path:
    """The variant spec on two tasks, one attack and a few variants, without the inherent-trigger probes."""
    data = yaml.safe_load(Path(SPEC).read_text())
    data["tasks"] = ["shapes", "digits"]
    data["attacks"] = [a for a in data["attacks"] if a["name"] == "badnets"]
    data["defenses"] = [d for d in data["defenses"] if d["name"] in keep]
    clean, attacked = data["scenarios"]
    clean.update(probe_attacks=False, probe_triggers=[])
    attacked["defenses"] = keep
    parse_spec(data, "spec")  # valid as written
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_quick_variants_run_writes_the_tradeoff_and_selects_on_clean_val_only(tmp_path, session_cache, monkeypatch):
    from evaluation import merge_eval

    calls = []
    original = merge_eval._Run.evaluate

    def spy(self, state, split, probes=(), names=None):
        calls.append((split, len(probes)))
        return original(self, state, split, probes, names)

    monkeypatch.setattr(merge_eval._Run, "evaluate", spy)
    keep = ["ibvs", "k2_mean", "topk_10", "project_merged"]
    out = tmp_path / "out"
    path = bv.main(["variants", "--spec", str(_quick_spec(tmp_path, keep)), "--quick", "true", "--methods", "ta",
                    "--out_dir", str(out), "--cache_dir", session_cache, "--device", "cpu"])
    assert path == out / "ibvs_variants.md"
    assert calls and all(n == 0 for split, n in calls if split == "val")  # α and λ are chosen without any trigger
    assert any(n > 0 for split, n in calls if split == "report")  # (the test rows do measure the attack)
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["defense"] for r in rows} == {"none", *keep}
    selections = [r["defense_selection"] for r in rows if r.get("defense_selection")]
    assert selections
    assert all(s["split"] == "val" and set(s["scores"]) == {"0.5", "1.0", "2.0", "4.0"} for s in selections)
    points = list(csv.DictReader((out / "ibvs_tradeoff.csv").open()))
    assert {p["variant"] for p in points} == set(keep) and {p["attack"] for p in points} == {"badnets"}
    for v in keep:
        mine = [p for p in points if p["variant"] == v]
        assert [float(p["alpha"]) for p in mine] == [0.0, 0.5, 1.0, 2.0, 4.0]
        assert sum(p["selected"] == "True" for p in mine) == 1 and mine[0]["selected"] == "False"
        assert float(mine[0]["delta_ca"]) == 0.0
        chosen = next(r for r in rows if r.get("defense") == v and r.get("defense_selected") and r["attack"] is None)
        assert float(next(p for p in mine if p["selected"] == "True")["alpha"]) == chosen["defense_alpha"]
    undefended = next(r for r in rows if r["scenario"] == "badnets" and r["defense"] == "none"
                      and r["merge"] == "task_arithmetic" and isinstance(r["attack"], dict) and r["attack"]["in_merge"])
    assert float(points[0]["asr"]) == pytest.approx(undefended["asr"])
    text = path.read_text()
    assert all(f"| {v} |" in text for v in keep) and "task_arithmetic λ 0.3" in text
    assert (out / "ibvs_tradeoff.png").stat().st_size > 1000 and (out / "summary.md").exists()


def test_variants_refuses_a_spec_without_defended_attacks_before_any_work(tmp_path, capsys, monkeypatch):
    from experiments import nodes

    monkeypatch.setitem(nodes.RUNNERS, "train", lambda *a: (_ for _ in ()).throw(AssertionError("trained")))
    assert bv.cli_main(["variants", "--spec", MAIN, "--methods", "some", "--out_dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == "bv.py: error: --methods='some'; use all or ta\n"
    data = yaml.safe_load(Path(MAIN).read_text())
    data["scenarios"][1]["defenses"] = []
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    assert bv.cli_main(["variants", "--spec", str(spec), "--out_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == (f"bv.py: error: --spec {spec}: no attack scenario with defenses; variants compares defenses on "
                   "attacks (see configs/experiments/ibvs_variants.yaml)\n")
    assert not (tmp_path / "o").exists()


def test_merge_py_takes_a_configured_variant_through_its_defenses_entries(pair_files, models, session_cache, tmp_path):
    import merge

    files, _ = pair_files
    entry = {"name": "ibvs", "inputs": {"clean": files["clean_a"][0], "backdoored": [files["bd_1"][0], files["bd_2"][0]]},
             "strengths": [0.0, 1.0], "init_args": {"combine": "sum", "topk": 50}, "max_drop": 1.0}
    argv = ["--models", *map(str, models), "--coefficients", "0.3", "--out_dir", str(tmp_path / "m"), "--cache_dir",
            session_cache, "--synthetic_train_size", "200", "--synthetic_test_size", "40", "--val_max_examples", "20",
            "--individual", "false", "--zero_shot", "false", "--device", "cpu", "--defenses", json.dumps([entry])]
    assert merge.main(argv) == 0
    rows = json.loads((tmp_path / "m" / "results.json").read_text())["rows"]
    plain, zero, one = ([r for r in rows if r.get("defense_alpha") == a] for a in (None, 0.0, 1.0))
    assert len(plain) == len(zero) == len(one) == 1 and zero[0]["clean_acc"] == plain[0]["clean_acc"]
    assert one[0]["defense"] == "ibvs" and one[0]["defense_selected"]
