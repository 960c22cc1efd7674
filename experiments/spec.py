"""An experiment as data: the typed spec (YAML, parsed with jsonargparse) and its validation.

A spec names the base model and tasks, the trainings (a recipe: config files + overrides + inputs such as a
trigger), the attacks (a poisoning attack is a training; a vector attack such as SBV is built from trained
pairs), the defenses (what they train, how strong, how the strength is chosen on clean data), and the merge
scenarios (models × plan of methods and coefficients × probes × defenses). ``load_spec`` refuses a bad spec
(unknown key or component, missing input, a cycle) with one line before any work.

The embedded main job is ``configs/experiments/embedded.yaml``; ``pipeline.py`` runs it by default.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from experiments.cli import UserError

KINDS = ("encoder", "trigger")


class SpecError(UserError):
    """A spec that cannot run; the one-line message names the entry and the fix."""


@dataclass
class Base:
    model_name: str = "badmerging-tiny"
    pretrained: Optional[str] = None


@dataclass
class Training:
    """One ``train.py fit`` run: ``configs`` + ``overrides`` on ``task``; ``inputs`` maps a model init
    argument to another training's artifact (e.g. ``trigger_path: trigger_ontask``)."""

    name: str
    task: str
    configs: list[str]
    kind: str = "encoder"
    overrides: list[str] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    quick: list[str] = field(default_factory=list)  # extra overrides of the reduced run (after spec.quick's)


@dataclass
class Finetune:
    """One clean fine-tune per task of the spec, each a training named ``name_format.format(task=...)``."""

    configs: list[str]
    overrides: list[str] = field(default_factory=list)
    name_format: str = "{task}"
    seed: int = 0


@dataclass
class VectorAttack:
    """A model built from trained pairs rather than trained itself: ``kind`` a registered vector attack (sbv)."""

    kind: str
    clean: str
    backdoored: dict[str, str]
    trigger_from: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Attack:
    """A backdoored contribution: a training (poisoning attack) or a vector attack; ``task`` is the one it replaces."""

    name: str
    training: Optional[str] = None
    vector: Optional[VectorAttack] = None


@dataclass
class Defense:
    """A registered defense ``method`` whose ``inputs`` (input name -> a training, or a list of trainings) the engine
    trains first; ``params`` are its constructor arguments (its init_args, e.g. IBVS's combine / restrict / topk /
    project_out; named as a vector attack's, since jsonargparse reserves ``init_args``). Rows carry ``name``, so
    several configurations of one method are told apart."""

    name: str
    method: str
    inputs: dict[str, str | list[str]] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    strengths: list[float] = field(default_factory=lambda: [1.0])
    select: Optional[str] = "val"
    max_drop: float = 0.02
    report: str = "all"  # strengths measured on test: "all", or "selected" (only the one `select` marks)


@dataclass
class Scenario:
    """Merges of one set of models. ``models``: ``clean`` (every task's clean fine-tune) or ``attack`` (one
    scenario per attack: its model + the clean fine-tunes of the other tasks)."""

    name: str
    models: str = "clean"
    plan: list[dict] = field(default_factory=list)
    plan_files: list[str] = field(default_factory=list)  # merge configs whose ``plan`` is appended
    plan_files_entry: dict[str, Any] = field(default_factory=dict)  # keys set on every entry read from plan_files
    probe_attacks: bool = False
    probe_triggers: list[str] = field(default_factory=list)
    defenses: list[str] = field(default_factory=list)
    zero_shot: bool = True
    individual: bool = True


@dataclass
class Quick:
    """The reduced run (``--quick``): overrides per training kind, evaluation sizes, trimmed method grids."""

    overrides: dict[str, list[str]] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    max_coefficients: int = 2
    hparams: dict[str, dict] = field(default_factory=dict)


@dataclass
class Evaluation:
    cache_dir: Optional[str] = None  # default: the run's cache_dir
    batch_size: int = 512
    synthetic_train_size: int = 40000
    synthetic_test_size: int = 1000
    val_max_examples: Optional[int] = 500
    gram_batch_size: int = 128
    data_dirs: dict[str, str] = field(default_factory=dict)


@dataclass
class ExperimentSpec:
    name: str
    tasks: list[str]
    base: Base = field(default_factory=Base)
    finetune: Optional[Finetune] = None
    trainings: list[Training] = field(default_factory=list)
    attacks: list[Attack] = field(default_factory=list)
    defenses: list[Defense] = field(default_factory=list)
    scenarios: list[Scenario] = field(default_factory=list)
    evaluation: Evaluation = field(default_factory=Evaluation)
    quick: Quick = field(default_factory=Quick)
    headline_coefficient: float = 0.3
    tasks_files: list[str] = field(default_factory=list)  # task files (configs/tasks/) loaded before the tasks are checked

    # -- derived views ------------------------------------------------------------------------------------------
    def all_trainings(self) -> dict[str, Training]:
        """Every training by name: the per-task clean fine-tunes first, then the listed ones."""
        out: dict[str, Training] = {}
        if self.finetune:
            for task in self.tasks:
                name = self.finetune.name_format.format(task=task)
                out[name] = Training(name=name, task=task, configs=list(self.finetune.configs),
                                     overrides=list(self.finetune.overrides), seed=self.finetune.seed)
        for t in self.trainings:
            out[t.name] = t
        return out

    def clean_models(self) -> dict[str, str]:
        """task -> the training name of its clean fine-tune."""
        if not self.finetune:
            return {}
        return {t: self.finetune.name_format.format(task=t) for t in self.tasks}

    def attack_task(self, attack: Attack) -> str:
        trainings = self.all_trainings()
        if attack.training:
            return trainings[attack.training].task
        return trainings[attack.vector.clean].task


def spec_parser():
    """jsonargparse parser of the spec (typed: unknown keys and wrong types are refused)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False, prog="spec")
    parser.add_class_arguments(ExperimentSpec, nested_key=None, fail_untyped=True)
    return parser


def parse_spec(data: dict, where: str) -> ExperimentSpec:
    """A mapping (a spec file's content) -> a validated ExperimentSpec."""
    from experiments.cli import parse_error_line

    parser = spec_parser()
    try:
        ns = parser.parse_object(data)
        spec = parser.instantiate_classes(ns)
    except Exception as e:  # jsonargparse wraps type errors in several exception types
        raise SpecError(f"{where}: {parse_error_line(e, 'configs/experiments/embedded.yaml for the format')}") from None
    spec = _as_spec(spec)
    load_tasks_files(spec, where)
    validate_spec(spec, where)
    return spec


def load_tasks_files(spec: ExperimentSpec, where: str) -> None:
    """Register the tasks of the spec's task files (and export them to workers) before its tasks are checked."""
    from experiments.cli import load_tasks_files as load  # the entry points' --tasks_file loader

    try:
        load(spec.tasks_files)
    except ValueError as e:
        raise SpecError(f"{where}: tasks_files: {e}") from None


def _as_spec(ns) -> ExperimentSpec:
    """jsonargparse returns a Namespace of instantiated dataclasses; make the top level an ExperimentSpec."""
    if isinstance(ns, ExperimentSpec):
        return ns
    values = {k: getattr(ns, k) for k in ExperimentSpec.__dataclass_fields__ if hasattr(ns, k)}
    return ExperimentSpec(**values)


def load_spec(path: str | Path) -> ExperimentSpec:
    from experiments.cli import read_config_mapping

    data = read_config_mapping(path, flag="--spec", shipped="configs/experiments/", error=SpecError)
    return parse_spec(data, f"--spec {path}")


def _check_files(where: str, paths: list[str]) -> None:
    for p in paths:
        if not Path(p).is_file():
            raise SpecError(f"{where}: {p} does not exist; fix the path in the spec")


def validate_spec(spec: ExperimentSpec, where: str = "spec") -> None:
    """Names, references, files and components, and the absence of cycles; one line per failure."""
    from datamodules.tasks import get_task

    if not spec.tasks:
        raise SpecError(f"{where}: tasks is empty; list the tasks to fine-tune and merge")
    if len(set(spec.tasks)) != len(spec.tasks):
        raise SpecError(f"{where}: tasks {spec.tasks} names a task twice; list each task once")
    for task in spec.tasks:
        try:
            get_task(task)
        except ValueError as e:
            raise SpecError(f"{where}: tasks: {e}") from None
    trainings = _check_trainings(spec, where)
    _check_attacks(spec, where, trainings)
    _check_defenses(spec, where, trainings)
    _check_scenarios(spec, where, trainings)
    training_order(trainings, where)  # raises on a cycle


def _check_trainings(spec: ExperimentSpec, where: str) -> dict[str, Training]:
    names = [t.name for t in spec.trainings] + list(spec.clean_models().values())
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise SpecError(f"{where}: training {dup!r} is defined twice; give every training a unique name")
    trainings = spec.all_trainings()
    for t in trainings.values():
        w = f"{where}: training {t.name}"
        if t.kind not in KINDS:
            raise SpecError(f"{w}: kind {t.kind!r} is unknown; use one of {', '.join(KINDS)}")
        if not t.configs:
            raise SpecError(f"{w}: no configs; list the train.py config files of its recipe")
        _check_files(w, t.configs)
        for arg, ref in t.inputs.items():
            if ref not in trainings:
                raise SpecError(f"{w}: input {arg} refers to {ref!r}, which is not a training of the spec; "
                                f"define it or fix the name (trainings: {', '.join(trainings)})")
        if isinstance(t.seed, bool) or not isinstance(t.seed, int) or t.seed < 0:
            raise SpecError(f"{w}: seed={t.seed!r} must be a non-negative integer")
    return trainings


def _check_attacks(spec: ExperimentSpec, where: str, trainings: dict[str, Training]) -> None:
    seen = set()
    for a in spec.attacks:
        w = f"{where}: attack {a.name}"
        if a.name in seen:
            raise SpecError(f"{w} is defined twice; give every attack a unique name")
        seen.add(a.name)
        if (a.training is None) == (a.vector is None):
            raise SpecError(f"{w}: give exactly one of training (a poisoning attack) or vector (e.g. SBV)")
        refs = [a.training] if a.training else [a.vector.clean, *a.vector.backdoored.values()]
        for ref in refs:
            if ref not in trainings:
                raise SpecError(f"{w}: refers to training {ref!r}, which the spec does not define; define it or fix the name")
        if a.vector is not None:
            _component(w, "vector kind", lambda: _vector_attack(a.vector))
            if a.vector.trigger_from not in a.vector.backdoored:
                raise SpecError(f"{w}: trigger_from {a.vector.trigger_from!r} is not one of its backdoored models "
                                f"({', '.join(a.vector.backdoored)})")
        if spec.attack_task(a) not in spec.clean_models() and any(s.models == "attack" for s in spec.scenarios):
            raise SpecError(f"{w}: its task {spec.attack_task(a)} is not among the spec's tasks {spec.tasks}; add it")


def _check_defenses(spec: ExperimentSpec, where: str, trainings: dict[str, Training]) -> None:
    from defenses import resolve_defense
    from evaluation.merge_eval import check_defense_report

    names = [d.name for d in spec.defenses]
    for d in spec.defenses:
        w = f"{where}: defense {d.name}"
        if names.count(d.name) > 1:
            raise SpecError(f"{w} is defined twice; give every defense a unique name")
        _component(w, "method", lambda d=d: resolve_defense(d.method))
        if d.params:
            _component(w, "params", lambda d=d: resolve_defense({"class_path": d.method, "init_args": d.params}))
        for arg, refs in d.inputs.items():
            if isinstance(refs, list) and not refs:
                raise SpecError(f"{w}: input {arg} is an empty list; list the trainings it takes")
            for ref in defense_refs(refs):
                if ref not in trainings:
                    raise SpecError(f"{w}: input {arg} refers to {ref!r}, which is not a training of the spec")
        if not d.strengths:
            raise SpecError(f"{w}: strengths is empty; list the strengths to evaluate")
        try:
            check_defense_report(d.report, d.select)  # the evaluation API's rule, before any training
        except ValueError as e:
            raise SpecError(f"{w}: {e}") from None


def defense_refs(value: str | list[str]) -> list[str]:
    """The trainings one defense input names: one, or a list."""
    return list(value) if isinstance(value, list) else [value]


def _vector_attack(v: VectorAttack):
    from attacks import VectorAttack as VectorAttackBase
    from attacks import make_attack

    return make_attack({"class_path": v.kind, "init_args": dict(v.params)}, VectorAttackBase)


def _component(where: str, what: str, resolve) -> None:
    """A registered component (or an import path) resolves; its registry's one-line refusal otherwise."""
    from experiments.cli import one_line

    try:
        resolve()
    except (ValueError, ImportError, TypeError) as e:
        raise SpecError(f"{where}: {what}: {one_line(e)}") from None


def _check_scenarios(spec: ExperimentSpec, where: str, trainings: dict[str, Training]) -> None:
    defenses = {d.name for d in spec.defenses}
    for s in spec.scenarios:
        w = f"{where}: scenario {s.name}"
        if s.models not in ("clean", "attack"):
            raise SpecError(f"{w}: models {s.models!r} is unknown; use clean or attack")
        if not spec.finetune:
            raise SpecError(f"{w}: merges need the clean fine-tunes; add a finetune section")
        _check_files(w, s.plan_files)
        for ref in s.probe_triggers:
            if ref not in trainings or trainings[ref].kind != "trigger":
                raise SpecError(f"{w}: probe trigger {ref!r} is not a trigger training of the spec")
        for ref in s.defenses:
            if ref not in defenses:
                raise SpecError(f"{w}: defense {ref!r} is not defined in the spec's defenses")
        _check_plan(w, s, len(spec.tasks))


def _check_plan(where: str, s: Scenario, n_models: int) -> None:
    """Every plan entry (its own and its plan files') through the evaluation API's check, before any training:
    unknown methods or hyperparameters, and coefficients not finite in float32, stop here."""
    import yaml

    from evaluation.merge_eval import validate_plan_entry
    from experiments.cli import one_line

    entries = plan_coefficients([dict(e) for e in s.plan], None)
    for f in s.plan_files:
        entries += [{**e, **s.plan_files_entry} for e in (yaml.safe_load(Path(f).read_text()) or {}).get("plan", [])]
    for e in entries:
        try:
            validate_plan_entry(e, n_models)
        except (ValueError, TypeError) as err:
            raise SpecError(f"{where}: plan: {one_line(err)}") from None


def training_order(trainings: dict[str, Training], where: str = "spec") -> list[str]:
    """Training names in dependency order (inputs first); a cycle is refused, naming it."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = path[path.index(name):] + [name]
            raise SpecError(f"{where}: trainings form a cycle {' -> '.join(cycle)}; one of them must not need the other")
        state[name] = 1
        for ref in trainings[name].inputs.values():
            visit(ref, path + [name])
        state[name] = 2
        order.append(name)

    for name in trainings:
        visit(name, [])
    return order


# -- adjustments from the command line ---------------------------------------------------------------------------
def restrict(spec: ExperimentSpec, *, tasks: list[str] | None = None, attacks: list[str] | None = None,
             defenses: list[str] | None = None, coefficients: list[float] | None = None, ta_only: bool = False,
             quick: bool = False) -> ExperimentSpec:
    """A copy of ``spec`` narrowed by the usual flags (each checked against the spec), then re-validated."""
    spec = copy.deepcopy(spec)
    if tasks is not None:
        unknown = [t for t in tasks if t not in spec.tasks]
        if unknown:
            raise SpecError(f"--tasks: {unknown} not in the spec's tasks {spec.tasks}; choose from them")
        spec.tasks = list(tasks)
    if attacks is not None:
        names = [a.name for a in spec.attacks]
        unknown = [a for a in attacks if a not in names]
        if unknown:
            raise SpecError(f"--attacks: unknown attack(s) {unknown}; choose from {', '.join(names)} or 'none'")
        spec.attacks = [a for a in spec.attacks if a.name in attacks]
    if defenses is not None:
        spec.defenses = [d for d in spec.defenses if d.name in defenses]
        for s in spec.scenarios:
            s.defenses = [d for d in s.defenses if d in defenses]
    if not spec.attacks:  # nothing to defend
        spec.defenses = []
        spec.scenarios = [s for s in spec.scenarios if s.models != "attack"]
        for s in spec.scenarios:
            s.defenses = []
    if attacks is not None:  # the inherent-trigger probes are the stage-1 triggers the kept attacks inject
        injected = _inputs_of_attacks(spec)
        for s in spec.scenarios:
            s.probe_triggers = [t for t in s.probe_triggers if t in injected]
    for s in spec.scenarios:
        s.plan = plan_coefficients(s.plan, coefficients)
        if ta_only:
            s.plan_files = []
    _drop_unused(spec)
    _check_tasks_kept(spec)
    validate_spec(spec, "spec")
    return spec


def plan_coefficients(plan: list[dict], coefficients: list[float] | None) -> list[dict]:
    """Plan entries with ``coefficients: grid`` take ``coefficients`` (``--coefficients``) or their own ``grid``;
    ``coefficients: {grid_within: [...], outside: false}`` take the grid's values inside (or outside) that set."""
    out = []
    for e in plan:
        e = dict(e)
        if e.get("coefficients") == "grid":
            e["coefficients"] = list(coefficients) if coefficients is not None else list(e["grid"])
        elif isinstance(e.get("coefficients"), dict):  # {grid_within: [...]}: the grid's values in that set
            within = e["coefficients"]["grid_within"]
            outside = e["coefficients"].get("outside", False)
            grid = list(coefficients) if coefficients is not None else list(e["grid"])
            e["coefficients"] = [c for c in grid if (c in within) != outside]
        e.pop("grid", None)
        if e.get("coefficients") == []:
            continue
        out.append(e)
    return out


def _inputs_of_attacks(spec: ExperimentSpec) -> set[str]:
    """Every training the spec's attacks need, transitively."""
    trainings = spec.all_trainings()
    stack = [r for a in spec.attacks for r in ([a.training] if a.training else [a.vector.clean, *a.vector.backdoored.values()])]
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack += list(trainings[name].inputs.values())
    return seen


def _drop_unused(spec: ExperimentSpec) -> None:
    """Trainings nothing needs any more (an attack or defense that was dropped) are not run."""
    used: set[str] = set()
    for a in spec.attacks:
        used |= {a.training} if a.training else {a.vector.clean, *a.vector.backdoored.values()}
    for d in spec.defenses:
        used |= {ref for refs in d.inputs.values() for ref in defense_refs(refs)}
    for s in spec.scenarios:
        used |= set(s.probe_triggers)
    trainings = spec.all_trainings()
    stack = list(used)
    while stack:
        for ref in trainings[stack.pop()].inputs.values():
            if ref not in used:
                used.add(ref)
                stack.append(ref)
    spec.trainings = [t for t in spec.trainings if t.name in used]


def _check_tasks_kept(spec: ExperimentSpec) -> None:
    for a in spec.attacks:
        if spec.attack_task(a) not in spec.tasks:
            raise SpecError(f"the attacks fine-tune {spec.attack_task(a)}: keep it in --tasks or pass --attacks none")
    trainings = spec.all_trainings()
    for d in spec.defenses:
        for ref in (r for refs in d.inputs.values() for r in defense_refs(refs)):
            if trainings[ref].task not in spec.tasks:
                raise SpecError(f"{d.name} trains the defender's pair on {trainings[ref].task}: keep it in --tasks "
                                "or pass --defense none")
