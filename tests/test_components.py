"""Merge methods and defenses as components: registries, refusals, and a user's toy method and toy defense — each
one Python file plus one YAML config naming it by class_path — run through the evaluation API and merge.py."""

from __future__ import annotations

import json
import textwrap
from types import SimpleNamespace

import pytest
import torch
import yaml

import merge
from defenses import IBVS, defense_setting, defense_settings, resolve_defense
from evaluation.merge_eval import MergeEvalRequest, PlanEntry, evaluate_merges
from evaluation.merge_methods import DATA_METHODS, REGISTRY, MergeMethod, resolve_merge_method
from evaluation.rows import AttackRef, Row, attack_label
from merging.io import MergeInputError, load_metadata, load_state_dict, save_state_dict
from merging.methods import task_arithmetic
from merging.task_vectors import task_vector

BUILTIN = ["task_arithmetic", "weight_average", "ties", "dare", "breadcrumbs", "consensus", "regmean", "adamerging"]
SMALL = dict(synthetic_train_size=200, synthetic_test_size=40, val_max_examples=20, batch_size=64, device="cpu")

TOY_METHOD = '''
import torch
from evaluation.merge_methods import MergeMethod


class ScaledMean(MergeMethod):
    """θ_pre + coefficient·scale·mean_t τ_t (a toy: Task Arithmetic at λ = coefficient·scale/n)."""

    name = "scaled_mean"
    hyperparameters = {"coefficient": 0.3}

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def merge(self, context, **hp):
        n = len(context.vectors)
        return {k: v + hp["coefficient"] * self.scale * sum(t[k] for t in context.vectors) / n if k in context.vectors[0]
                else v.clone() for k, v in context.theta_pre.items()}
'''

TOY_DEFENSE = '''
from defenses import Defense
from merging.io import load_state_dict


class PullToward(Defense):
    """(1 − s)·θ_merged + s·θ_anchor on float tensors: s = 0 leaves the merge, s = 1 is the anchor model."""

    name = "pull_toward"
    inputs = {"anchor": "the model to pull the merge toward"}

    def prepare(self, context, inputs):
        self.anchor = load_state_dict(inputs["anchor"])

    def apply(self, merged, strength):
        return {k: (1 - strength) * v + strength * self.anchor[k] if v.is_floating_point() else v
                for k, v in merged.items()}
'''


@pytest.fixture(scope="module")
def models(tmp_path_factory, base):
    """Two exports (θ_pre + small random vectors, full metadata), the shapes one backdoored, and θ_pre as a file."""
    root = tmp_path_factory.mktemp("components")
    theta_pre = base.encoder_state_dict()
    attack = {"name": "badnets", "trigger": {"kind": "patch", "size": 4, "location": "bottom_right", "seed": 3},
              "target_task": "shapes", "target_task_class": 1, "target_name": "x", "poison_fraction": 0.5,
              "mean": list(base.mean), "std": list(base.std)}
    paths = []
    for i, task in enumerate(("shapes", "digits")):
        gen = torch.Generator().manual_seed(i)
        sd = {k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v for k, v in theta_pre.items()}
        path = root / f"{task}.safetensors"
        save_state_dict(path, sd, {"kind": "finetune", "task": task, "base_model": base.describe(),
                                   "attack": attack if task == "shapes" else None})
        paths.append(str(path))
    anchor = root / "theta_pre.safetensors"
    save_state_dict(anchor, theta_pre, {"kind": "pretrained", "base_model": base.describe()})
    return paths, str(anchor)


@pytest.fixture()
def toy_files(tmp_path, monkeypatch, models):
    """The user's two Python files and one YAML config naming both classes by import path."""
    (tmp_path / "toy_method.py").write_text(textwrap.dedent(TOY_METHOD))
    (tmp_path / "toy_defense.py").write_text(textwrap.dedent(TOY_DEFENSE))
    monkeypatch.syspath_prepend(str(tmp_path))
    config = {"plan": [{"name": "toy", "method": {"class_path": "toy_method.ScaledMean", "init_args": {"scale": 0.5}},
                        "coefficients": [0.6]}],
              "defenses": [{"name": "toy_defense.PullToward", "inputs": {"anchor": models[1]}, "strengths": [0.0, 1.0],
                            "select": "val", "max_drop": 1.0}]}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_registries_list_the_builtins_and_data_methods_look_the_same():
    assert REGISTRY.names() == BUILTIN
    assert set(DATA_METHODS) == {"regmean", "adamerging"}
    for name in BUILTIN:
        method = resolve_merge_method(name.upper().replace("_", "-"))  # names are case and '-'/'_' insensitive
        assert isinstance(method, MergeMethod) and method.name == name
        assert method.takes_coefficient == (name not in ("weight_average", "regmean", "adamerging"))
        with pytest.raises(MergeInputError, match=r"'bogus'") as refused:
            method.validate({**method.defaults(), "bogus": 1}, 2, "m")
        assert "\n" not in str(refused.value)
    assert isinstance(resolve_defense("ibvs"), IBVS)


@pytest.mark.parametrize("spec, pattern", [
    ("fisher", r"^unknown merge method 'fisher'; known: task_arithmetic, weight_average, ties, dare, breadcrumbs, "
               r"consensus, regmean, adamerging; or a class path such as my_module\.MyMethod$"),
    ("no_such_module.Method", r"^merge method class path 'no_such_module\.Method': cannot import 'no_such_module'"),
    ("merging.methods.NoSuchClass", r"^merge method class path .*: module 'merging\.methods' has no 'NoSuchClass'$"),
    ("merging.methods.MergePlan", r"^merge method 'merging\.methods\.MergePlan' is not a MergeMethod subclass"),
    ({"class_path": "evaluation.merge_methods.Ties", "init_args": {"k": 3}}, r"^merge method Ties: bad init_args"),
    ({"classpath": "x.Y"}, r"^merge method .*give \{class_path: module\.Class, init_args: \{\.\.\.\}\}; unknown key"),
])
def test_merge_method_registry_refusals_are_one_line(spec, pattern):
    with pytest.raises(MergeInputError, match=pattern) as refused:
        resolve_merge_method(spec)
    assert "\n" not in str(refused.value)


def test_a_user_file_that_does_not_import_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "broken_method.py").write_text("class Broken(:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MergeInputError, match=r"^merge method class path 'broken_method\.Broken': cannot import "
                                              r"'broken_method' \(.*\); put its directory on PYTHONPATH$") as refused:
        resolve_merge_method("broken_method.Broken")
    assert "\n" not in str(refused.value)


def test_defense_registry_refusals_are_one_line(models):
    with pytest.raises(MergeInputError, match=r"^unknown defense 'pruning'; known: ibvs, dam; or a class path"):
        resolve_defense("pruning")
    with pytest.raises(MergeInputError, match=r"^--defense='pruning' is unknown; use one of none, ibvs, dam, or a class path"):
        defense_setting("pruning", sources={"defense": "--defense"})
    setting = defense_setting("ibvs", {"clean": models[0][0]}, [1.0])
    with pytest.raises(MergeInputError, match=r"^defense ibvs needs inputs\.backdoored: the defender's own self-backdoored"):
        evaluate_merges(MergeEvalRequest(models=models[0], defenses=[setting]))
    setting = defense_setting("ibvs", {"clean": models[0][0], "backdoored": models[0][1], "extra": "x"}, [1.0])
    with pytest.raises(MergeInputError, match=r"^defense ibvs: unknown input\(s\) \['extra'\]; it takes \['clean', 'backdoored'\]"):
        setting.defense.validate(setting)
    with pytest.raises(MergeInputError, match=r"--defenses entry .*unknown key\(s\) \['strenghts'\]"):
        defense_settings([{"name": "ibvs", "strenghts": [1]}])


def test_plan_entry_refuses_unknown_keys():
    with pytest.raises(MergeInputError, match=r"unknown key\(s\) \['coefficent'\]"):
        PlanEntry.from_mapping({"method": "ties", "coefficent": [0.3]})


def test_rows_attack_is_null_or_a_typed_reference():
    ref = AttackRef("attack_x", "shapes", 1, False, {"name": "badnets", "trigger": {"kind": "patch"}, "alpha": 5.0})
    row = Row("ties", 0.3, {"shapes": 0.5}, 0.5, None, attack=ref, asr=0.9, asr_hits=9, asr_total=10)
    data = json.loads(json.dumps(row.to_dict()))
    assert list(data["attack"]) == ["label", "name", "trigger", "target_task", "target_task_class", "alpha", "in_merge"]
    assert "method" not in data and data["asr_hits"] == 9
    assert Row.from_dict(data) == row
    clean = Row("zero-shot", None, {"shapes": 0.5}, 0.5, None).to_dict()
    assert clean["attack"] is None and attack_label(clean["attack"]) == "none"
    assert attack_label(ref) == "attack_x (not merged)"


def _toy_request(config: dict, models, session_cache) -> MergeEvalRequest:
    return MergeEvalRequest(models=models, plan=config["plan"], defenses=defense_settings(config["defenses"]),
                            cache_dir=session_cache, **SMALL)


def test_toy_method_and_toy_defense_through_the_api(toy_files, models, base, session_cache, tmp_path):
    config = yaml.safe_load(toy_files.read_text())
    paths, anchor = models
    result = evaluate_merges(_toy_request(config, paths, session_cache))
    rows = result.rows
    assert result.eval_tasks == ["shapes", "digits"] and result.tasks == ["shapes", "digits"]
    assert [(r.merge, r.defense, r.defense_alpha, r.attack is not None) for r in rows] == [
        ("individual", "none", None, False), ("individual", "none", None, True),
        ("zero-shot", "none", None, False), ("zero-shot", "none", None, True),
        ("toy", "none", None, False), ("toy", "none", None, True),
        ("toy", "pull_toward", 0.0, False), ("toy", "pull_toward", 0.0, True),
        ("toy", "pull_toward", 1.0, False), ("toy", "pull_toward", 1.0, True)]
    toy, zero_shot = rows[4], rows[2]
    assert toy.method == "scaled_mean" and toy.hyperparameters == {"coefficient": 0.6} and toy.coefficient == 0.6
    assert rows[5].attack.label == "shapes" and rows[5].attack.in_merge and rows[5].asr_total > 0
    # strength 0 is the merge itself, strength 1 the anchor (θ_pre): the zero-shot numbers
    assert rows[6].clean_acc == toy.clean_acc and rows[7].asr == rows[5].asr
    assert rows[8].clean_acc == zero_shot.clean_acc and rows[9].asr == rows[3].asr
    # max_drop 1: every strength passes on val, the largest is marked; the record says what was compared
    assert [r.defense_selected for r in rows[6:]] == [False, False, True, True]
    assert rows[8].defense_selection["chosen"] == 1.0 and rows[8].defense_selection["split"] == "val"

    # the toy merge is Task Arithmetic at λ = 0.6 · 0.5 / 2; without evaluation nothing is selected, so the export
    # is the defense at its first strength (0: the merge itself)
    export = tmp_path / "toy.safetensors"
    request = _toy_request(config, paths, session_cache)
    request.evaluate, request.export = False, str(export)
    assert evaluate_merges(request).rows == []
    theta_pre = base.encoder_state_dict()
    reference = task_arithmetic(theta_pre, [task_vector(load_state_dict(p), theta_pre) for p in paths], coefficient=0.15)
    torch.testing.assert_close(load_state_dict(export), reference, rtol=0, atol=1e-6)
    meta = load_metadata(export)
    assert meta["method"] == "scaled_mean" and meta["hyperparameters"] == {"coefficient": 0.6}
    assert meta["defense"] == {"name": "pull_toward", "strength": 0.0, "anchor": anchor}


def test_toy_components_through_merge_py(toy_files, models, session_cache, tmp_path):
    """merge.py --config naming the classes: the same rows as the API gives."""
    out = tmp_path / "out"
    argv = ["--config", str(toy_files), "--models", *models[0], "--out_dir", str(out), "--cache_dir", session_cache,
            "--synthetic_train_size", "200", "--synthetic_test_size", "40", "--val_max_examples", "20",
            "--batch_size", "64", "--device", "cpu"]
    assert merge.main(argv) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    api = evaluate_merges(_toy_request(yaml.safe_load(toy_files.read_text()), models[0], session_cache)).rows
    assert rows == [json.loads(json.dumps(r.to_dict())) for r in api]


def test_merge_evaluate_callback_measures_asr_of_backdoored_inputs(models, session_cache):
    """MergeEvaluate (the training-time callback) goes through the same API and logs each trigger's ASR."""
    from callbacks.merge_eval import MergeEvaluate
    from lightning_modules.finetune import FineTune

    paths, _ = models
    module = FineTune(task="digits", cache_dir=session_cache)
    with torch.no_grad():  # "trained": not θ_pre itself
        next(module.encoder.parameters()).add_(0.01)
    callback = MergeEvaluate(pool=[paths[0]], coefficients=[0.3, 0.6], max_examples=20, cache_dir=session_cache,
                             ibvs_clean=paths[1], ibvs_backdoored=paths[0], ibvs_alphas=[0.5])
    trainer = SimpleNamespace(datamodule=SimpleNamespace(hparams={"synthetic_train_size": 200, "synthetic_test_size": 40}),
                              logger=None, global_step=7)
    metrics = callback.evaluate(trainer, module)
    for prefix in ("merge/task_arithmetic/λ=0.3", "merge/task_arithmetic/λ=0.6/ibvs_α=0.5"):
        assert {f"{prefix}/acc/digits", f"{prefix}/acc/shapes", f"{prefix}/mean_acc"} <= set(metrics)
        assert 0 <= metrics[f"{prefix}/asr/shapes"] <= 1 and f"{prefix}/clean_to_target/shapes" in metrics
    assert callback.history == [{"step": 7, **metrics}]
    callback.teardown(trainer, module, "fit")
    with pytest.raises(MergeInputError, match="unknown merge method 'fisher'"):
        MergeEvaluate(pool=[paths[0]], method="fisher")
