"""The README's "Extending" walk-through, run through the experiment engine: a new attack, a new defense and a new
merge method, each one Python file plus one config, with no edit to the engine, merge.py or pipeline.py."""

from __future__ import annotations

import json
import textwrap

import pytest
import yaml

from experiments.executors import LocalExecutor
from experiments.graph import RunOptions
from experiments.run import run_experiment
from experiments.spec import SpecError, parse_spec

ATTACK = '''
"""CornerPatch: BadNets' poisoned cross-entropy with a random patch the config places (here top-left)."""
from attacks import PoisonedCrossEntropy


class CornerPatch(PoisonedCrossEntropy):
    name = "corner_patch"
    trigger_kind = "patch"

    def export_fields(self, module):
        return {"corner": module.trigger_spec.location}
'''

DEFENSE = '''
"""Shrink: pull the merged weights toward a reference model, θ + s·(θ_ref − θ)."""
from defenses import Defense
from merging.io import load_state_dict


class Shrink(Defense):
    name = "shrink"
    inputs = {"reference": "the model to shrink toward (an exported encoder)"}

    def prepare(self, context, inputs):
        self.reference = load_state_dict(inputs["reference"])

    def apply(self, merged, strength):
        return {k: v + strength * (self.reference[k].to(v.dtype) - v) if v.is_floating_point() else v
                for k, v in merged.items()}
'''

METHOD = '''
"""Mean-of-tasks: θ_pre + λ·mean_t τ_t (task arithmetic with the sum replaced by the mean)."""
from evaluation.merge_methods import MergeMethod


class MeanOfTasks(MergeMethod):
    name = "mean_of_tasks"
    hyperparameters = {"coefficient": 1.0}

    def merge(self, context, coefficient=1.0):
        n = len(context.vectors)
        return {k: v + coefficient * sum(t[k] for t in context.vectors) / n if v.is_floating_point() else v
                for k, v in context.theta_pre.items()}
'''

QUICK = ["--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--data.synthetic_train_size", "300",
         "--data.synthetic_test_size", "60", "--data.batch_size", "16", "--trainer.enable_progress_bar", "false"]


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """The three components' files on the import path, and the attack's config."""
    for name, text in (("my_attack", ATTACK), ("my_defense", DEFENSE), ("my_method", METHOD)):
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "corner_patch.yaml"  # what configs/attack/<x>.yaml holds
    config.write_text("model:\n  init_args:\n    attack: {class_path: my_attack.CornerPatch}\n"
                      "    trigger: {kind: patch, size: 6, location: top_left, seed: 11}\n    target_class: 3\n")
    return config


def _spec(attack_config) -> dict:
    return {
        "name": "extending", "tasks": ["shapes", "digits"],
        "finetune": {"configs": ["configs/experiment/embedded_finetune.yaml"], "overrides": QUICK},
        "trainings": [{"name": "attack_corner_patch", "task": "shapes", "overrides": QUICK,
                       "configs": ["configs/experiment/embedded_injection.yaml", str(attack_config)]}],
        "attacks": [{"name": "corner_patch", "training": "attack_corner_patch"}],
        "defenses": [{"name": "shrink", "method": "my_defense.Shrink", "inputs": {"reference": "digits"},
                      "strengths": [0.0, 0.5], "select": "val", "max_drop": 0.5}],
        "scenarios": [{"name": "attacked", "models": "attack", "zero_shot": False, "defenses": ["shrink"],
                       "plan": [{"name": "mean_of_tasks", "method": "my_method.MeanOfTasks", "coefficients": [1.0]},
                                {"name": "task_arithmetic", "method": "task_arithmetic", "coefficients": [0.5]}]}],
        "evaluation": {"synthetic_train_size": 300, "synthetic_test_size": 60, "val_max_examples": 20},
    }


def test_new_attack_defense_and_method_run_through_the_engine(plugins, tmp_path, session_cache):
    spec = parse_spec(yaml.safe_load(yaml.safe_dump(_spec(plugins))), "test spec")
    options = RunOptions(out_dir=str(tmp_path / "out"), cache_dir=session_cache, progress=False)
    results = run_experiment(spec, options, LocalExecutor(1), report=False)
    rows = json.loads(results.read_text())["rows"]
    backdoor = [r for r in rows if isinstance(r["attack"], dict) and r["attack"]["in_merge"]]

    # the attack: trained through BackdoorInjection, its trigger measured on every merge
    assert {r["attack"]["name"] for r in backdoor} == {"corner_patch"}
    meta = json.loads((tmp_path / "out" / "models" / "attack_corner_patch.json").read_text())
    assert meta["attack"]["corner"] == "top_left"
    assert all(r["attack"]["target_task_class"] == 3 and r["asr_total"] > 0 for r in backdoor)
    # the method: rows named by the plan, the same numbers as TA at λ·n when λ = 1 (mean = sum / 2)
    merges = {(r["merge"], r["coefficient"], r["defense"], r.get("defense_alpha")) for r in backdoor}
    assert ("mean_of_tasks", 1.0, "none", None) in merges and ("task_arithmetic", 0.5, "none", None) in merges
    mean_row = next(r for r in backdoor if r["merge"] == "mean_of_tasks" and r["defense"] == "none")
    ta_row = next(r for r in backdoor if r["merge"] == "task_arithmetic" and r["defense"] == "none")
    assert mean_row["clean_acc"] == ta_row["clean_acc"] and mean_row["asr"] == ta_row["asr"]
    # the defense: every strength on every merge, one selected per merge on val; strength 0 changes nothing
    shrunk = [r for r in backdoor if r["defense"] == "shrink"]
    assert {(r["merge"], r["defense_alpha"]) for r in shrunk} == {(m, s) for m in ("mean_of_tasks", "task_arithmetic")
                                                                   for s in (0.0, 0.5)}
    for merge in ("mean_of_tasks", "task_arithmetic"):
        assert sum(bool(r["defense_selected"]) for r in shrunk if r["merge"] == merge) == 1
        zero = next(r for r in shrunk if r["merge"] == merge and r["defense_alpha"] == 0.0)
        plain = next(r for r in backdoor if r["merge"] == merge and r["defense"] == "none")
        assert zero["clean_acc"] == plain["clean_acc"] and zero["asr"] == plain["asr"]


def test_a_misspelt_component_is_refused_before_any_work(plugins, tmp_path):
    data = _spec(plugins)
    data["defenses"][0]["method"] = "my_defense.Shrnk"
    with pytest.raises(SpecError, match="Shrnk"):
        parse_spec(data, "test spec")
    assert not any(tmp_path.glob("out*"))
