"""The experiment engine: spec parsing and refusals, cache keys (one rule for every caller), resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from experiments.cache import recipe_key
from experiments.graph import RunOptions, build_graph
from experiments.spec import SpecError, load_spec, parse_spec, restrict

SPEC = "configs/experiments/embedded.yaml"
ROOT = Path(__file__).resolve().parents[1]


def _spec_data() -> dict:
    return yaml.safe_load(Path(SPEC).read_text())


def _refusal(data: dict, pattern: str) -> str:
    with pytest.raises(SpecError) as e:
        parse_spec(data, "spec")
    message = str(e.value)
    assert "\n" not in message and pattern in message, message
    return message


# -- parsing and refusals ----------------------------------------------------------------------------------------
def test_shipped_spec_parses_and_expands():
    spec = load_spec(SPEC)
    nodes = build_graph(spec, RunOptions(out_dir="unused"))
    kinds = [n.kind for n in nodes.values()]
    assert kinds.count("train") == 4 + 8 and kinds.count("vector") == 2
    assert kinds.count("evaluate") == 1 + len(spec.attacks)
    order = list(nodes)
    for nid, node in nodes.items():  # dependency order: every input comes before the node
        assert all(order.index(d) < order.index(nid) for d in node.deps)
    assert nodes["train:attack_ut_only"].deps == ["train:trigger_ontask"]


def test_unknown_key_is_refused():
    data = _spec_data()
    data["trainings"][0]["confgs"] = data["trainings"][0]["configs"]
    _refusal(data, "confgs")


def test_unknown_components_are_refused():
    data = _spec_data()
    data["defenses"][0]["method"] = "nosuch"
    assert "ibvs" in _refusal(data, "nosuch")
    data = _spec_data()
    data["attacks"][4]["vector"]["kind"] = "nosuch"
    _refusal(data, "nosuch")
    data = _spec_data()
    data["tasks"] = ["shapes", "nosuch"]
    _refusal(data, "nosuch")


def test_missing_inputs_are_refused(tmp_path):
    data = _spec_data()
    data["trainings"][2]["inputs"] = {"trigger_path": "trigger_nowhere"}
    _refusal(data, "trigger_nowhere")
    data = _spec_data()
    data["attacks"][0]["training"] = "attack_nowhere"
    _refusal(data, "attack_nowhere")
    data = _spec_data()
    data["trainings"][0]["configs"] = [str(tmp_path / "missing.yaml")]
    _refusal(data, "does not exist")
    data = _spec_data()
    data["scenarios"][1]["defenses"] = ["nodefense"]
    _refusal(data, "nodefense")


def test_cycle_is_refused():
    data = _spec_data()
    trigger = data["trainings"][0]
    trigger["inputs"] = {"trigger_path": "attack_ut_only"}  # the trigger now needs the attack that needs it
    message = _refusal(data, "cycle")
    assert "trigger_ontask" in message and "attack_ut_only" in message


def test_restrict_checks_flags_against_the_spec():
    spec = load_spec(SPEC)
    with pytest.raises(SpecError, match="nosuch"):
        restrict(spec, attacks=["nosuch"])
    with pytest.raises(SpecError, match="keep it in --tasks"):
        restrict(spec, tasks=["digits", "textures"])
    clean_only = restrict(spec, attacks=[])
    assert not clean_only.defenses and [s.name for s in clean_only.scenarios] == ["clean"]
    assert clean_only.trainings == []  # triggers, attacks and the defender's pair are not needed
    ta = restrict(spec, coefficients=[0.3, 0.6], ta_only=True)
    attacked = next(s for s in ta.scenarios if s.name == "attacked")
    assert [e["coefficients"] for e in attacked.plan] == [[0.3], [0.6]]  # TA defended at λ 0.3, undefended at 0.6
    assert attacked.plan_files == []  # --methods ta: the matrix's other methods are dropped


# -- cache keys ----------------------------------------------------------------------------------------------------
def _keys(spec, **options) -> dict[str, str]:
    return {nid: n.key for nid, n in build_graph(spec, RunOptions(out_dir="x", **options)).items()}


def test_keys_ignore_where_things_go_and_follow_every_recipe_change(tmp_path):
    spec = load_spec(SPEC)
    a = _keys(spec)
    assert a == _keys(load_spec(SPEC), cache_dir=str(tmp_path))  # output locations are not in the key
    assert a == _keys(spec, train_overrides=["--trainer.default_root_dir", "/elsewhere"])
    assert _keys(spec, quick=True)["train:shapes"] != a["train:shapes"]
    changed = _keys(spec, train_overrides=["--trainer.max_steps", "7"])
    assert all(changed[n] != a[n] for n in a)  # every node depends on a training

    data = _spec_data()
    data["trainings"][0]["seed"] = 1  # the on-task trigger: it and everything downstream of it change
    b = _keys(parse_spec(data, "spec"))
    assert b["train:trigger_ontask"] != a["train:trigger_ontask"]
    assert b["train:attack_ut_only"] != a["train:attack_ut_only"]
    assert b["train:attack_badnets"] == a["train:attack_badnets"] and b["train:shapes"] == a["train:shapes"]

    config = tmp_path / "finetune.yaml"  # the same config text elsewhere is the same recipe; other text is not
    config.write_text(Path("configs/experiment/embedded_finetune.yaml").read_text())
    data = _spec_data()
    data["finetune"]["configs"] = [str(config)]
    assert _keys(parse_spec(data, "spec"))["train:digits"] == a["train:digits"]
    config.write_text(config.read_text() + "\n# changed\n")
    assert _keys(parse_spec(data, "spec"))["train:digits"] != a["train:digits"]


def test_key_includes_base_weights_and_data_version(monkeypatch):
    import datamodules.synthetic as synthetic
    import experiments.graph as graph

    spec = load_spec(SPEC)
    a = _keys(spec)
    monkeypatch.setitem(synthetic.TASK_VERSIONS, "digits", 99)
    b = _keys(spec)
    assert b["train:digits"] != a["train:digits"] and b["train:shapes"] == a["train:shapes"]
    monkeypatch.setattr(graph, "base_digest", lambda *_: "other-weights")
    assert _keys(spec)["train:shapes"] != a["train:shapes"]


def test_recipe_key_is_order_independent_for_mappings():
    assert recipe_key({"a": 1, "b": [1, 2]}) == recipe_key({"b": [1, 2], "a": 1})
    assert recipe_key({"a": 1, "b": [1, 2]}) != recipe_key({"a": 1, "b": [2, 1]})


# -- resume after SIGKILL --------------------------------------------------------------------------------------------
def _pipeline(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1"}
    return subprocess.Popen([sys.executable, "pipeline.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("seconds",)} for r in rows]


@pytest.mark.slow
def test_killed_run_resumes_without_redoing_finished_nodes(tmp_path):
    common = ["--quick", "--attacks", "badnets", "--defense", "none", "--methods", "ta",
              "--coefficients", "0.3", "--cache_dir", str(tmp_path / "cache")]
    first = _pipeline([*common, "--out_dir", str(tmp_path / "a")])
    artifacts = tmp_path / "cache" / "artifacts"
    deadline = time.time() + 600
    while time.time() < deadline:  # SIGKILL once two trainings are published, in the middle of the rest
        if len(list(artifacts.glob("*/recipe.json"))) >= 2:
            break
        assert first.poll() is None, first.stdout.read()
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done_before = {p.parent.name for p in artifacts.glob("*/recipe.json")}
    assert 2 <= len(done_before) < 6  # 4 clean fine-tunes, BadNets, 2 scenarios

    second = _pipeline([*common, "--out_dir", str(tmp_path / "a")])
    log = second.communicate(timeout=900)[0]
    assert second.returncode == 0, log
    for key in done_before:  # finished nodes were found in the cache, not redone
        assert f"cached ({key})" in log and f"running ({key})" not in log
    assert not list(artifacts.glob(".*.tmp"))  # the killed run's temporary directories are gone

    fresh = _pipeline([*common[:-1], str(tmp_path / "cache2"), "--out_dir", str(tmp_path / "b")])
    log = fresh.communicate(timeout=900)[0]
    assert fresh.returncode == 0, log
    resumed = json.loads((tmp_path / "a" / "results.json").read_text())["rows"]
    uninterrupted = json.loads((tmp_path / "b" / "results.json").read_text())["rows"]
    assert _comparable(resumed) == _comparable(uninterrupted)


def _embedded_with(change):
    import copy

    import yaml

    data = copy.deepcopy(yaml.safe_load(open(SPEC)))
    change(data)
    return data


def test_spec_refuses_a_bad_defense_report():
    from experiments.spec import parse_spec

    def report(value, select="val"):
        def change(d):
            d["defenses"][0].update(report=value, select=select)
        return _embedded_with(change)

    assert parse_spec(report("selected"), "spec").defenses[0].report == "selected"
    with pytest.raises(SpecError, match=r"^spec: defense ibvs: report='some'; use all \(every strength on test\) or selected$"):
        parse_spec(report("some"), "spec")
    with pytest.raises(SpecError, match=r"^spec: defense ibvs: report: selected needs select: val"):
        parse_spec(report("selected", None), "spec")


def test_spec_refuses_a_bad_measure_attacks():
    from experiments.spec import parse_spec

    def change(d):
        d["scenarios"][1]["plan_files_entry"] = {"measure_attacks": "some"}

    with pytest.raises(SpecError, match=r"^spec: scenario attacked: plan: weight_average: measure_attacks must be true, "
                                        r"false or 'merged' \(only the merged models' triggers\), got 'some'$"):
        parse_spec(_embedded_with(change), "spec")


# -- a defense's params (its init_args) and list-valued inputs (issue 16) -------------------------------------------
def _with_variant(**entry):
    def change(d):
        d["defenses"].append({"name": "variant", "method": "ibvs", "strengths": [1.0],
                              "inputs": {"clean": "bv_clean_shapes", "backdoored": "ibvs_backdoored_shapes"}, **entry})
        d["scenarios"][1]["defenses"] = ["ibvs", "variant"]
    return _embedded_with(change)


def test_spec_refuses_bad_defense_params_and_inputs_before_any_work():
    cases = {
        "spec: defense variant: params: ibvs: combine='median' is unknown; use one of sum, mean, elect":
            {"params": {"combine": "median"}},
        "spec: defense variant: params: defense IBVS: bad init_args {'nosuch': 1}": {"params": {"nosuch": 1}},
        "spec: defense variant: input backdoored refers to 'nosuch', which is not a training of the spec":
            {"inputs": {"clean": "bv_clean_shapes", "backdoored": ["ibvs_backdoored_shapes", "nosuch"]}},
        "spec: defense variant: input backdoored is an empty list; list the trainings it takes":
            {"inputs": {"clean": "bv_clean_shapes", "backdoored": []}},
        "spec: defense ibvs is defined twice; give every defense a unique name": {"name": "ibvs"},
    }
    for message, entry in cases.items():
        with pytest.raises(SpecError) as e:
            parse_spec(_with_variant(**entry), "spec")
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_defense_params_and_list_inputs_enter_the_evaluation_key_only_when_given():
    options = RunOptions(out_dir="unused")
    main = build_graph(parse_spec(_embedded_with(lambda d: None), "spec"), options)
    plain = main["evaluate:attacked:badnets"].recipe["defenses"]
    assert [sorted(d) for d in plain] == [["inputs", "max_drop", "method", "name", "report", "select", "strengths"]]
    two = {"clean": "bv_clean_shapes", "backdoored": ["ibvs_backdoored_shapes", "attack_badnets"]}
    keys = set()
    for entry in ({}, {"params": {"topk": 10}}, {"params": {"topk": 20}}, {"inputs": two}):
        nodes = build_graph(parse_spec(_with_variant(**entry), "spec"), options)
        node = nodes["evaluate:attacked:badnets"]
        variant = node.recipe["defenses"][1]
        assert variant["label"] == "variant" and node.recipe["defenses"][0] == plain[0]
        assert ("init_args" in variant) == ("params" in entry)
        keys.add(node.key)
        assert nodes["evaluate:clean"].key == main["evaluate:clean"].key  # a scenario without the defense keeps its key
    assert len(keys) == 4  # every change of params or inputs is another evaluation
    listed = build_graph(parse_spec(_with_variant(inputs=two), "spec"), options)["evaluate:attacked:badnets"]
    assert listed.recipe["defenses"][1]["inputs"]["backdoored"] == [
        main["train:ibvs_backdoored_shapes"].key, main["train:attack_badnets"].key]
    assert "train:attack_badnets" in listed.deps


def test_restrict_keeps_the_trainings_of_list_inputs():
    spec = parse_spec(_with_variant(inputs={"clean": "bv_clean_shapes", "backdoored": ["ibvs_backdoored_shapes",
                                                                                      "attack_ut_only"]}), "spec")
    narrowed = restrict(spec, attacks=["badnets"])
    names = {t.name for t in narrowed.trainings}
    assert {"attack_ut_only", "trigger_ontask", "ibvs_backdoored_shapes"} <= names  # the variant still needs them
    assert "attack_badmerging_ontask" not in names
