"""A spec expanded into a graph of artifact nodes, each keyed before anything runs.

Nodes: ``train`` (an encoder or a stage-1 trigger), ``vector`` (an SBV export from trained pairs) and
``evaluate`` (one merge scenario's rows). A node's key hashes its recipe (experiments.cache), which holds the
keys of its inputs, so the whole graph is keyed up front and a finished node is found by key alone.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.cache import base_digest, data_version, file_digest, recipe_key, seed_overrides
from experiments.spec import Base, ExperimentSpec, Scenario, Training, training_order

# Flags that place outputs or show progress: they never change a number, so they stay out of the key.
LOCATION_FLAGS = ("--trainer.default_root_dir", "--trainer.logger.init_args.save_dir", "--trainer.enable_progress_bar",
                  "--model.init_args.cache_dir", "--data.cache_dir")


@dataclass
class Node:
    id: str  # "train:<name>", "vector:<attack>", "evaluate:<scenario>"
    kind: str
    key: str
    recipe: dict
    deps: list[str] = field(default_factory=list)  # node ids
    payload: dict = field(default_factory=dict)  # what the runner needs besides the dependencies' artifacts


@dataclass
class RunOptions:
    """How (not what) to run: none of these enter a key."""

    out_dir: str
    cache_dir: str = ".cache/badmerging"
    quick: bool = False
    progress: bool = True
    train_overrides: list[str] = field(default_factory=list)  # extra train.py flags for every training (in the key)

    @property
    def artifacts(self) -> str:
        return str(Path(self.cache_dir) / "artifacts")


def _strip_locations(args: list[str]) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a in LOCATION_FLAGS:
            skip = True
            continue
        if a.split("=", 1)[0] in LOCATION_FLAGS:
            continue
        out.append(a)
    return out


def training_overrides(spec: ExperimentSpec, t: Training, options: RunOptions) -> list[str]:
    """The flags of one training, in the order train.py sees them (the seed rule last)."""
    quick = (spec.quick.overrides.get(t.kind, []) + t.quick) if options.quick else []
    # The spec's base and local data reach every training (first, so a training's own overrides still win); the
    # embedded default adds nothing, so its keys stay as they were.
    base = []
    if (spec.base.model_name, spec.base.pretrained) != (Base().model_name, Base().pretrained):
        base = ["--model.init_args.model_name", spec.base.model_name]
        if spec.base.pretrained is not None:
            base += ["--model.init_args.pretrained", spec.base.pretrained]
    data = ["--data.data_dir", spec.evaluation.data_dirs[t.task]] if t.task in spec.evaluation.data_dirs else []
    return _strip_locations([*base, *data, *t.overrides, *options.train_overrides, *quick]) + seed_overrides(t.seed)


def training_recipe(spec: ExperimentSpec, t: Training, options: RunOptions, input_keys: dict[str, str]) -> dict:
    return {"node": "train", "kind": t.kind, "task": t.task, "configs": [file_digest(c) for c in t.configs],
            "overrides": training_overrides(spec, t, options), "inputs": dict(sorted(input_keys.items())),
            "base": base_digest(spec.base.model_name, spec.base.pretrained), "data_version": data_version(t.task)}


def build_graph(spec: ExperimentSpec, options: RunOptions) -> dict[str, Node]:
    """Every node of ``spec``, in dependency order (a dict keeps insertion order)."""
    nodes: dict[str, Node] = {}
    trainings = spec.all_trainings()
    for name in training_order(trainings):
        t = trainings[name]
        inputs = {arg: nodes[f"train:{ref}"].key for arg, ref in t.inputs.items()}
        recipe = training_recipe(spec, t, options, inputs)
        nodes[f"train:{name}"] = Node(f"train:{name}", "train", recipe_key(recipe), recipe,
                                      deps=[f"train:{ref}" for ref in t.inputs.values()],
                                      payload={"name": name, "kind": t.kind, "task": t.task, "configs": list(t.configs),
                                               "overrides": recipe["overrides"], "inputs": dict(t.inputs)})
    for a in spec.attacks:
        if a.vector is None:
            continue
        v = a.vector
        recipe = {"node": "vector", "name": a.name, "kind": v.kind, "clean": nodes[f"train:{v.clean}"].key,
                  "backdoored": {label: nodes[f"train:{ref}"].key for label, ref in v.backdoored.items()},
                  "trigger_from": v.trigger_from, "params": v.params}
        nodes[f"vector:{a.name}"] = Node(f"vector:{a.name}", "vector", recipe_key(recipe), recipe,
                                         deps=[f"train:{v.clean}", *[f"train:{r}" for r in v.backdoored.values()]],
                                         payload={"name": a.name, "vector": {"kind": v.kind, "clean": v.clean,
                                                                             "backdoored": dict(v.backdoored),
                                                                             "trigger_from": v.trigger_from,
                                                                             "params": dict(v.params)}})
    for s in spec.scenarios:
        for instance in scenario_instances(spec, s, options):
            nodes[instance.id] = instance_node(nodes, instance)
    return nodes


@dataclass
class ScenarioInstance:
    """One merge scenario with its models resolved to node ids (and the file labels they get)."""

    id: str
    scenario: str
    models: list[tuple[str, str]]  # (label, node id)
    probe_models: list[tuple[str, str]]
    probe_triggers: list[tuple[str, str]]
    defenses: list[dict]  # {name, method, inputs: {arg: (label, node id) | {"list": [(label, node id), ...]}},
    #                        strengths, select, max_drop, report[, init_args][, label]}
    plan: list[dict]
    flags: dict[str, Any]


def attack_model(spec: ExperimentSpec, name: str) -> tuple[str, str]:
    """(file label, node id) of an attack's model: ``attack_<name>``."""
    a = next(a for a in spec.attacks if a.name == name)
    return f"attack_{name}", f"train:{a.training}" if a.training else f"vector:{name}"


def _label(spec: ExperimentSpec, training: str) -> str:
    attack = next((a.name for a in spec.attacks if a.training == training), None)
    return f"attack_{attack}" if attack else training


def scenario_instances(spec: ExperimentSpec, s: Scenario, options: RunOptions) -> list[ScenarioInstance]:
    clean = spec.clean_models()
    plan = scenario_plan(s, spec, options)
    flags = {**{k: getattr(spec.evaluation, k) for k in spec.evaluation.__dataclass_fields__ if k != "cache_dir"},
             **(spec.quick.evaluation if options.quick else {}),
             "zero_shot": s.zero_shot, "individual": s.individual,
             "model_name": spec.base.model_name, "pretrained": spec.base.pretrained}
    defenses = []
    for name in s.defenses:
        d = next(d for d in spec.defenses if d.name == name)
        entry = {"name": d.name, "method": d.method, "strengths": list(d.strengths), "select": d.select,
                 "max_drop": d.max_drop, "report": d.report,
                 "inputs": {arg: {"list": [(r, f"train:{r}") for r in refs]} if isinstance(refs, list)
                            else (refs, f"train:{refs}") for arg, refs in d.inputs.items()}}
        if d.params:  # only when given: the keys of the plain defense's evaluations stay what they were
            entry["init_args"] = dict(d.params)
        if d.name != d.method:  # rows name the configuration, not the method (in the key: the rows change)
            entry["label"] = d.name
        defenses.append(entry)
    triggers = [(ref, f"train:{ref}") for ref in s.probe_triggers]
    if s.models == "clean":
        models = [(_label(spec, n), f"train:{n}") for n in clean.values()]
        probes = [attack_model(spec, a.name) for a in spec.attacks] if s.probe_attacks else []
        return [ScenarioInstance(f"evaluate:{s.name}", s.name, models, probes, triggers, defenses, plan, flags)]
    out = []
    for a in spec.attacks:
        task = spec.attack_task(a)
        models = [attack_model(spec, a.name)] + [(_label(spec, n), f"train:{n}") for t, n in clean.items() if t != task]
        out.append(ScenarioInstance(f"evaluate:{s.name}:{a.name}", a.name, models, [], triggers, defenses, plan, flags))
    return out


def scenario_plan(s: Scenario, spec: ExperimentSpec, options: RunOptions) -> list[dict]:
    """The scenario's own plan entries, then those of its plan files (trimmed in the reduced run)."""
    import yaml

    from experiments.spec import plan_coefficients

    plan = plan_coefficients([copy.deepcopy(e) for e in s.plan], None)
    for f in s.plan_files:
        for e in yaml.safe_load(Path(f).read_text())["plan"]:
            e = {**e, **s.plan_files_entry}
            if options.quick:
                e["coefficients"] = e.get("coefficients", [None])[:spec.quick.max_coefficients]
                e["hparams"] = {**e.get("hparams", {}), **spec.quick.hparams.get(e["method"], {})}
            plan.append(e)
    return plan


def input_refs(ref) -> list[tuple[str, str]]:
    """(label, node id) of every training one defense input names: ``(label, id)`` or ``{"list": [...]}``."""
    return list(ref["list"]) if isinstance(ref, dict) else [ref]


def instance_node(nodes: dict[str, Node], inst: ScenarioInstance) -> Node:
    def keyed(pairs):
        return [[label, nodes[nid].key] for label, nid in pairs]

    defenses = [{**{k: v for k, v in d.items() if k != "inputs"},
                 "inputs": {arg: [nodes[nid].key for _, nid in ref["list"]] if isinstance(ref, dict) else nodes[ref[1]].key
                            for arg, ref in d["inputs"].items()}} for d in inst.defenses]
    recipe = {"node": "evaluate", "models": keyed(inst.models), "probe_models": keyed(inst.probe_models),
              "probe_triggers": keyed(inst.probe_triggers), "defenses": defenses, "plan": inst.plan, "flags": inst.flags}
    deps = [nid for _, nid in inst.models + inst.probe_models + inst.probe_triggers]
    deps += [nid for d in inst.defenses for ref in d["inputs"].values() for _, nid in input_refs(ref)]
    payload = {"scenario": inst.scenario, "models": inst.models, "probe_models": inst.probe_models,
               "probe_triggers": inst.probe_triggers, "defenses": inst.defenses, "plan": inst.plan, "flags": inst.flags}
    return Node(inst.id, "evaluate", recipe_key(recipe), recipe, deps=list(dict.fromkeys(deps)), payload=payload)
