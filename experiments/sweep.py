"""Sweeps: an experiment spec plus grid axes, run cell by cell into one results table through the engine.

A sweep config (configs/sweep/) names a spec (default ``configs/experiments/embedded.yaml``) and the axes
``attacks × methods × coefficients × defenses × seeds``; attacks and defenses are the spec's, by name. One cell
= (attack, method, coefficient, defense, seed) = one engine ``evaluate`` node: the attack's model plus the
clean fine-tunes of the other tasks (every clean fine-tune for attack ``none``), merged with the method at λ,
under the defense. Every training of a cell is the spec's training with

    overrides = the training's own + train_args (encoders) or trigger_args (triggers),  seed = the cell's seed

so its engine key (experiments.graph.training_recipe) is the main job's whenever the recipe is the same: a
seed-0 cell with ``train_args`` = the spec's quick encoder overrides reuses ``pipeline.py --quick``'s models
from a shared ``cache_dir``. Models, and each cell's rows, live in ``<cache_dir>/artifacts`` (one cache).

The table is ``<out_dir>/results.jsonl``: one JSON line per finished cell (the five axes, ``config_hash`` = the
cell's evaluate-node key, code version, models and their keys, the merged model's ``rows``), appended whole
with fsync under a file lock, so a killed sweep leaves no partial cell and concurrent array tasks never
interleave; ``results.csv`` is regenerated from it, ``sweep_config.yaml`` is the resolved config. A cell whose
key and hash are in the table is skipped (rerun to resume); a changed recipe changes the hash, so the cell runs
again. SIGUSR1 (SLURM's ``--signal=SIGUSR1@90``) requeues the array task and stops; during a training on SLURM
it goes to Lightning, which checkpoints and requeues, and the requeued training resumes.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import io
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from experiments.cli import UserError, check_output_path, one_line, read_config_mapping
from experiments.graph import Node, RunOptions, build_graph
from experiments.spec import Defense, Evaluation, ExperimentSpec, Scenario, load_spec

__all__ = ["CSV", "CONFIG_COPY", "DEFAULT_SPEC", "TABLE", "Cell", "CellGraph", "Sweep", "SweepError", "SweepSettings",
           "array_slice", "cell_graph", "cells", "list_cells", "load_config", "read_table", "resolve", "run", "write_csv",
           "write_text_atomic"]

DEFAULT_SPEC = "configs/experiments/embedded.yaml"
GRID_KEYS = ("attacks", "methods", "coefficients", "defenses", "seeds")
METHOD_KEYS = ("method", "hparams")
DEFENSE_KEYS = ("defense", "method", "inputs", "strengths", "select", "max_drop")
NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
TABLE, CSV, CONFIG_COPY, LOCK = "results.jsonl", "results.csv", "sweep_config.yaml", ".results.lock"


class SweepError(UserError):
    """Bad sweep input: the one-line message names the input and the fix."""


@dataclass
class SweepSettings:
    """What a sweep config holds (the sweep.py flags of the same names override it)."""

    grid: dict = field(default_factory=dict)
    spec: str = DEFAULT_SPEC
    out_dir: Optional[str] = None  # default: outputs/sweep/<config file stem>
    cache_dir: str = ".cache/badmerging"
    tasks: Optional[list[str]] = None  # default: the spec's
    methods: dict = field(default_factory=dict)  # name -> {method, hparams}
    defenses: dict = field(default_factory=dict)  # name -> {defense | method, inputs, strengths, select, max_drop}
    train_args: list = field(default_factory=list)  # extra train.py flags of every encoder training
    trigger_args: list = field(default_factory=list)  # extra train.py flags of every stage-1 trigger
    evaluation: dict = field(default_factory=dict)  # overrides of the spec's evaluation settings


@dataclass
class Sweep:
    """A resolved, checked sweep: everything a cell needs."""

    source: str
    spec_path: str
    spec: ExperimentSpec
    out_dir: str
    cache_dir: str
    tasks: list[str]
    grid: dict
    methods: dict  # name -> {name, method, hparams}
    fixed: list[str]  # methods without a coefficient: one cell each
    defenses: dict  # name -> Defense (None for none)
    train_args: list[str]
    trigger_args: list[str]
    evaluation: dict
    _seeded: dict = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict:
        """The resolved settings (sweep_config.yaml): a valid sweep config."""
        return {"source": self.source, "spec": self.spec_path, "out_dir": self.out_dir, "cache_dir": self.cache_dir,
                "tasks": self.tasks, "grid": self.grid,
                "methods": {n: {"method": m["method"], "hparams": m["hparams"]} for n, m in self.methods.items()},
                "defenses": {n: {k: v for k, v in dataclasses.asdict(d).items() if k != "name"}
                             for n, d in self.defenses.items() if d is not None},
                "train_args": self.train_args, "trigger_args": self.trigger_args, "evaluation": self.evaluation}


@dataclass(frozen=True)
class Cell:
    index: int
    attack: str
    method: str
    coefficient: float | None
    defense: str
    seed: int

    @property
    def key(self) -> str:
        coef = "none" if self.coefficient is None else f"{self.coefficient:g}"
        return f"attack={self.attack},method={self.method},coefficient={coef},defense={self.defense},seed={self.seed}"

    @property
    def dirname(self) -> str:
        return self.key.replace(",", "__").replace("=", "-")


# -- the config: read, check everything before any work ------------------------------------------------------------
def load_config(path: str, out_dir: str | None = None) -> Sweep:
    """A sweep config file -> the resolved Sweep (``out_dir`` overrides the file's)."""
    raw = read_config_mapping(path, shipped="configs/sweep/", error=SweepError)
    known = [f.name for f in dataclasses.fields(SweepSettings)]
    _unknown_keys(path, raw, known, "")
    settings = SweepSettings(**raw)
    if out_dir is not None:
        settings.out_dir = out_dir
    return resolve(settings, path)


def _unknown_keys(where: str, given: dict, known, what: str) -> None:
    unknown = [k for k in given if k not in known]
    if unknown:
        raise SweepError(f"{where}: unknown key {unknown[0]!r}{what}; fix its spelling or remove it "
                         f"(known: {', '.join(known)})")


def _str_list(where: str, key: str, value) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
        raise SweepError(f"{where}: {key} must be a list of strings, got {value!r}")
    return [str(v) for v in value]


def _axis(where: str, grid: dict, key: str, default=None) -> list:
    values = grid.get(key, default)
    if values is None or (isinstance(values, list) and not values):
        raise SweepError(f"{where}: grid.{key} is empty; list at least one value (the grid is the product of its axes, "
                         "so an empty axis leaves no cell)")
    values = values if isinstance(values, list) else [values]
    for v in values:
        if values.count(v) > 1:
            raise SweepError(f"{where}: grid.{key} lists {v!r} twice; list each value once")
    return values


def _check_dir(path: str, key: str) -> None:
    """``path`` is a directory or can be created as one (the one writability check, with the sweep's fix)."""
    try:
        check_output_path(path, key, is_dir=True, error=SweepError)
    except SweepError as e:
        raise SweepError(str(e).replace(f"pass another {key}", f"set {key} in the config (or pass --{key}) to a "
                                        "writable place").replace("pass a directory", f"set {key} in the config (or "
                                                                  f"pass --{key}) to a directory")) from None


def resolve(settings: SweepSettings, where: str) -> Sweep:
    """Check every setting against the spec and the registries, before any work; one line per failure."""
    grid = settings.grid
    if not isinstance(grid, dict) or not grid:
        raise SweepError(f"{where}: grid is empty or missing; give grid: {{attacks: [...], methods: [...], "
                         "coefficients: [...]} (defenses and seeds default to [none] and [0]), e.g. in a --config file")
    _unknown_keys(where, grid, GRID_KEYS, " under grid")
    spec = load_spec(settings.spec)
    tasks = _tasks(where, settings.tasks, spec)
    attacks = _attacks(where, _axis(where, grid, "attacks"), spec, tasks)
    coefficients = _coefficients(where, _axis(where, grid, "coefficients"))
    seeds = _axis(where, grid, "seeds", [0])
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise SweepError(f"{where}: grid.seeds: {s!r} is not a non-negative integer; give seeds such as [0, 1]")
    methods, fixed = _methods(where, _axis(where, grid, "methods"), settings.methods, coefficients, len(tasks))
    defenses = _defenses(where, _axis(where, grid, "defenses", ["none"]), settings.defenses, spec)
    evaluation = _evaluation(where, settings.evaluation)
    stem = Path(where).stem if where.endswith((".yaml", ".yml", ".json")) else "default"
    sweep = Sweep(source=str(where), spec_path=str(settings.spec), spec=spec,
                  out_dir=str(settings.out_dir or f"outputs/sweep/{stem}"), cache_dir=str(settings.cache_dir),
                  tasks=tasks, grid={"attacks": attacks, "methods": list(methods), "coefficients": coefficients,
                                     "defenses": list(defenses), "seeds": seeds},
                  methods=methods, fixed=fixed, defenses=defenses,
                  train_args=_str_list(where, "train_args", settings.train_args),
                  trigger_args=_str_list(where, "trigger_args", settings.trigger_args), evaluation=evaluation)
    for key in ("out_dir", "cache_dir"):
        _check_dir(getattr(sweep, key), key)
    return sweep


def _tasks(where: str, tasks, spec: ExperimentSpec) -> list[str]:
    from datamodules.tasks import get_task

    tasks = list(spec.tasks) if tasks is None else _str_list(where, "tasks", tasks)
    if not tasks:
        raise SweepError(f"{where}: tasks is empty; list the tasks to merge, e.g. [{', '.join(spec.tasks)}]")
    for t in tasks:
        try:
            get_task(t)
        except ValueError as e:
            raise SweepError(f"{where}: tasks: {one_line(e)}") from None
        if tasks.count(t) > 1:
            raise SweepError(f"{where}: tasks lists {t!r} twice; list each task once")
        if t not in spec.tasks:
            raise SweepError(f"{where}: tasks: {t!r} is not a task of the spec {spec.name} ({', '.join(spec.tasks)}); "
                             "choose from them or name another spec")
    return tasks


def _attacks(where: str, attacks: list, spec: ExperimentSpec, tasks: list[str]) -> list[str]:
    known = ["none", *(a.name for a in spec.attacks)]
    for a in map(str, attacks):
        if a not in known:
            raise SweepError(f"{where}: grid.attacks: unknown attack {a!r}; choose from {', '.join(known)}")
    for a in spec.attacks:
        task = spec.attack_task(a)
        if a.name in attacks and task not in tasks:
            raise SweepError(f"{where}: the attacks fine-tune {task}, which tasks lacks; add it to tasks "
                             "or keep only 'none' in grid.attacks")
    return [str(a) for a in attacks]


def _coefficients(where: str, values: list) -> list[float]:
    out = []
    for c in values:
        if isinstance(c, bool) or not isinstance(c, (int, float)):
            raise SweepError(f"{where}: grid.coefficients: {c!r} is not a number; give merge coefficients λ such as 0.3")
        # the evaluation API's rule: finite in float32, the dtype of the weights the sweep trains and merges
        import torch

        from merging.task_vectors import not_finite_in

        reason = not_finite_in(c, torch.float32)
        if reason:
            raise SweepError(f"{where}: grid.coefficients: {c!r} {reason}; give finite merge coefficients λ such as 0.3")
        if c < 0:
            raise SweepError(f"{where}: grid.coefficients: {c!r} is negative; give coefficients λ >= 0 "
                             "(task negation is not a merge of this sweep: run merge.py for it)")
        out.append(float(c))
    return out


def _methods(where: str, names: list, defined, coefficients: list[float], n_models: int) -> tuple[dict, list[str]]:
    """name -> {name, method, hparams}, each checked at every λ by the evaluation API; and those without a λ."""
    from evaluation.merge_eval import validate_plan_entry
    from evaluation.merge_methods import REGISTRY

    if not isinstance(defined, dict):
        raise SweepError(f"{where}: methods must map names to {{method: ..., hparams: {{...}}}}, got {defined!r}")
    methods, fixed = {}, []
    for name in map(str, names):
        entry = defined.get(name)
        if entry is not None:
            if not isinstance(entry, dict) or not entry.get("method"):
                raise SweepError(f"{where}: methods.{name} must be a mapping with a method, e.g. "
                                 "{method: ties, hparams: {k: 20}}")
            _unknown_keys(where, entry, METHOD_KEYS, f" under methods.{name}")
        method, hparams = (str(entry["method"]), entry.get("hparams") or {}) if entry else (name, {})
        if method not in REGISTRY.names() and "." not in method:
            raise SweepError(f"{where}: {'methods.' + name if entry else 'grid.methods'}: unknown merge method "
                             f"{method!r}; use one of {', '.join(REGISTRY.names())} or a name defined under methods:")
        if not NAME.match(name):
            raise SweepError(f"{where}: method name {name!r} may hold only letters, digits and _ . + -; rename it")
        try:
            resolved = validate_plan_entry({"name": name, "method": method, "hparams": hparams,
                                            "coefficients": coefficients}, n_models)
        except ValueError as e:
            message = one_line(e)
            raise SweepError(f"{where}: methods.{name}: {message.removeprefix(f'{name}: ')}") from None
        methods[name] = {"name": name, "method": method, "hparams": hparams}
        if resolved.needs_data or not resolved.takes_coefficient:
            fixed.append(name)
    return methods, fixed


def _defenses(where: str, names: list, defined, spec: ExperimentSpec) -> dict:
    """name -> the Defense a cell applies (None: none). Every other name is declared under ``defenses:`` as
    ``{defense: <a defense of the spec>, strengths, select, max_drop}`` (the spec's settings where not given;
    ``defense`` defaults to the name) or as a new one ``{method, inputs: {input: training}, strengths, ...}``."""
    if not isinstance(defined, dict):
        raise SweepError(f"{where}: defenses must map names to defense settings, got {defined!r}")
    in_spec = {d.name: d for d in spec.defenses}
    out = {}
    for name in map(str, names):
        if not NAME.match(name):
            raise SweepError(f"{where}: defense name {name!r} may hold only letters, digits and _ . + -; rename it")
        if name == "none":
            if defined.get("none") not in (None, [], {}):
                raise SweepError(f"{where}: defenses.none: none is built in (no defense); remove its settings")
            out[name] = None
        elif name in defined:
            out[name] = _defined_defense(where, name, defined[name] or {}, in_spec, spec)
        else:
            known = ", ".join(["none", *(n for n in defined if n != "none")])
            raise SweepError(f"{where}: grid.defenses: unknown defense {name!r}; define it under defenses: as {name}: "
                             f"{{defense: <a defense of the spec: {', '.join(in_spec) or 'none defined'}>, strengths: "
                             f"[...]}}, or use one of {known}")
    return out


def _defined_defense(where: str, name: str, entry, in_spec: dict, spec: ExperimentSpec) -> Defense:
    from defenses import REGISTRY

    w = f"{where}: defenses.{name}"
    if not isinstance(entry, dict):
        raise SweepError(f"{w}: {entry!r} is not a mapping; give {{defense: <a defense of the spec: "
                         f"{', '.join(in_spec) or 'none defined'}>, strengths: [...]}} or {{method, inputs, strengths}} "
                         "(merge.py arguments are not defense settings)")
    _unknown_keys(w, entry, DEFENSE_KEYS, "")
    base = entry.get("defense", name if name in in_spec else None)
    if base is not None and base not in in_spec:
        raise SweepError(f"{w}: defense {base!r} is not a defense of the spec; use one of {', '.join(in_spec) or '(none)'}")
    values = {**(dataclasses.asdict(in_spec[base]) if base else {}), **{k: v for k, v in entry.items() if k != "defense"}}
    if not values.get("method"):
        raise SweepError(f"{w}: no method; give defense: <a defense of the spec> or method: <a registered defense>")
    if values["method"] not in REGISTRY.names() and "." not in str(values["method"]):
        raise SweepError(f"{w}: method {values['method']!r} is not a registered defense; use one of "
                         f"{', '.join(REGISTRY.names())}")
    trainings = spec.all_trainings()
    for arg, ref in (values.get("inputs") or {}).items():
        if ref not in trainings:
            raise SweepError(f"{w}: input {arg} refers to {ref!r}, which is not a training of the spec")
    strengths = values.get("strengths") or []
    if not isinstance(strengths, list) or not strengths or not all(
            isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s >= 0 for s in strengths):
        raise SweepError(f"{w}: strengths={strengths!r} must be a non-empty list of finite numbers ≥ 0")
    if values.get("select", "val") not in (None, "val"):
        raise SweepError(f"{w}: select must be 'val' or null, got {values['select']!r}")
    drop = values.get("max_drop", 0.02)
    if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0 <= drop <= 1:
        raise SweepError(f"{w}: max_drop={drop!r} must be a fraction in [0, 1], e.g. 0.02")
    return Defense(**{**values, "name": name})


def _evaluation(where: str, values) -> dict:
    known = [f.name for f in dataclasses.fields(Evaluation) if f.name != "cache_dir"]
    if not isinstance(values, dict):
        raise SweepError(f"{where}: evaluation must map settings ({', '.join(known)}) to values, got {values!r}")
    _unknown_keys(where, values, known, " under evaluation")
    return dict(values)


# -- cells and their engine nodes ------------------------------------------------------------------------------------
def cells(sweep: Sweep) -> list[Cell]:
    """Every cell, in a fixed order (seed, attack, method, coefficient, defense); methods without a coefficient
    (weight_average, RegMean, AdaMerging) take one cell with coefficient None."""
    out = []
    g = sweep.grid
    for seed, attack, method in itertools.product(g["seeds"], g["attacks"], g["methods"]):
        coefficients = [None] if method in sweep.fixed else g["coefficients"]
        for coef, defense in itertools.product(coefficients, g["defenses"]):
            out.append(Cell(len(out), attack, method, coef, defense, seed))
    return out


def seeded_spec(sweep: Sweep, seed: int) -> ExperimentSpec:
    """The spec with every training at ``seed`` and the sweep's extra flags after its own overrides."""
    if seed not in sweep._seeded:
        spec = copy.deepcopy(sweep.spec)
        spec.tasks = list(sweep.tasks)
        if spec.finetune:
            spec.finetune.seed = seed
            spec.finetune.overrides = [*spec.finetune.overrides, *sweep.train_args]
        for t in spec.trainings:
            t.seed = seed
            t.overrides = [*t.overrides, *(sweep.trigger_args if t.kind == "trigger" else sweep.train_args)]
        spec.evaluation = Evaluation(**{**dataclasses.asdict(spec.evaluation), **sweep.evaluation})
        spec.scenarios, spec.defenses = [], []
        sweep._seeded[seed] = spec
    return sweep._seeded[seed]


@dataclass
class CellGraph:
    """The nodes one cell needs, in dependency order (its evaluation last), and how to run them."""

    nodes: dict[str, Node]
    evaluation: Node
    options: RunOptions

    @property
    def key(self) -> str:
        return self.evaluation.key

    def models(self) -> list[tuple[str, str]]:
        """(label, node id) of the merged models."""
        return [tuple(m) for m in self.evaluation.payload["models"]]


def cell_graph(sweep: Sweep, cell: Cell, progress: bool = False) -> CellGraph:
    """The cell as engine nodes: the spec's trainings (and vector attack) it needs plus one ``evaluate`` node."""
    spec = copy.copy(seeded_spec(sweep, cell.seed))  # shallow: the trainings are shared, only these lists change
    spec.attacks = [a for a in spec.attacks if a.name == cell.attack]
    defense = sweep.defenses[cell.defense]
    spec.defenses = [] if defense is None else [defense]
    entry = {**sweep.methods[cell.method], "coefficients": [cell.coefficient]}
    spec.scenarios = [Scenario(name="sweep", models="clean" if cell.attack == "none" else "attack", plan=[entry],
                               defenses=[d.name for d in spec.defenses], zero_shot=False, individual=True)]
    options = RunOptions(out_dir=str(Path(sweep.out_dir) / "cells" / cell.dirname), cache_dir=sweep.cache_dir,
                         progress=progress)
    nodes = build_graph(spec, options)
    evaluation = next(n for n in nodes.values() if n.kind == "evaluate")
    needed, stack = {evaluation.id}, list(evaluation.deps)
    while stack:
        nid = stack.pop()
        if nid not in needed:
            needed.add(nid)
            stack += nodes[nid].deps
    return CellGraph({nid: n for nid, n in nodes.items() if nid in needed}, evaluation, options)


# -- the table: one JSON line per cell, appended whole under a lock ----------------------------------------------------
def _locked(out_dir: Path):
    from filelock import FileLock

    out_dir.mkdir(parents=True, exist_ok=True)
    return FileLock(str(out_dir / LOCK))


def read_table(out_dir: str | Path) -> list[dict]:
    """The finished cells of ``<out_dir>/results.jsonl`` (a torn last line, from a crash mid-write, is ignored)."""
    path = Path(out_dir) / TABLE
    if not path.exists():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and "cell" in entry and "rows" in entry:
            entries.append(entry)
    return entries


def _append(out_dir: Path, entry: dict) -> bool:
    """Append one cell's line (whole, fsynced) unless that cell and hash are already there; regenerate the CSV."""
    path = out_dir / TABLE
    with _locked(out_dir):
        if any(e["cell"] == entry["cell"] and e["config_hash"] == entry["config_hash"] for e in read_table(out_dir)):
            return False
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # a line torn by a crash mid-write: cut it off
                data = os.pread(fd, size, 0)
                os.ftruncate(fd, data.rfind(b"\n") + 1)
            data = (json.dumps(entry, default=str) + "\n").encode()
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        write_csv(out_dir)
    return True


def write_csv(out_dir: Path) -> Path:
    """results.csv from results.jsonl: one line per row of every cell (written to a temp name, then renamed)."""
    from evaluation.rows import attack_label

    entries = read_table(out_dir)
    tasks = list(dict.fromkeys(t for e in entries for r in e["rows"] for t in r["clean_acc"]))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["cell", "attack", "method", "coefficient", "defense", "seed", "trigger", "in_merge", "mean_clean_acc",
                "normalized_acc", "asr", "ra", "clean_to_target", "asr_hits", "asr_total", *[f"acc_{t}" for t in tasks],
                "merge_defense", "defense_alpha", "defense_selected", "config_hash", "code_version"])
    for e in entries:
        for r in e["rows"]:
            a = r["attack"]
            w.writerow([e["cell"], e["attack"], e["method"], e["coefficient"], e["defense"], e["seed"],
                        attack_label(a).replace(" (not merged)", ""), a.get("in_merge") if isinstance(a, dict) else None,
                        r["mean_clean_acc"], r["normalized_acc"], r.get("asr"), r.get("ra"), r.get("clean_to_target"),
                        r.get("asr_hits"), r.get("asr_total"), *[r["clean_acc"].get(t) for t in tasks], r.get("defense"),
                        r.get("defense_alpha"), r.get("defense_selected"), e["config_hash"], e["code_version"]])
    write_text_atomic(Path(out_dir) / CSV, buf.getvalue())
    return Path(out_dir) / CSV


def write_text_atomic(path: Path, text: str) -> None:
    """``path`` holds ``text`` whole or not at all (a temp sibling, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- running cells ---------------------------------------------------------------------------------------------------
def run_cell(sweep: Sweep, cell: Cell, array: str = "0/1", progress: bool = False) -> dict:
    """Train what the cell needs (or find it cached), evaluate its merge through the engine; its table line."""
    from experiments.cache import ArtifactCache
    from experiments.executors import LocalExecutor
    from experiments.nodes import artifact_path, link_model, run_node
    from modeling.version import code_version

    t0 = time.time()
    graph = cell_graph(sweep, cell, progress)
    trainings = {nid: n for nid, n in graph.nodes.items() if n.kind != "evaluate"}
    with _requeue_signal_to_lightning():
        LocalExecutor().run(trainings, graph.options)
    run_node(graph.evaluation, graph.nodes, graph.options)
    cache = ArtifactCache(graph.options.artifacts)
    models_dir = Path(graph.options.out_dir) / "models"
    models = {label: str(link_model(artifact_path(cache, graph.nodes[nid]), models_dir / f"{label}.safetensors"))
              for label, nid in graph.models()}
    rows = json.loads(artifact_path(cache, graph.evaluation).read_text())
    rows = [r for r in rows if r["merge"] not in ("individual", "zero-shot")]  # the merged model's rows
    return {"cell": cell.key, "attack": cell.attack, "method": cell.method, "coefficient": cell.coefficient,
            "defense": cell.defense, "seed": cell.seed, "config_hash": graph.key, "code_version": code_version(),
            "seconds": round(time.time() - t0, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "array_task": array,
            "models": list(models.values()), "keys": {label: graph.nodes[nid].key for label, nid in graph.models()},
            "rows": rows}


@contextlib.contextmanager
def _requeue_signal_to_lightning():
    """On SLURM, SIGUSR1 during a training goes to Lightning (it installs its handler only where none is set):
    it saves an hpc checkpoint and requeues the task, and the requeued training resumes from it."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if not (hasattr(signal, "SIGUSR1") and SLURMEnvironment.detect()
            and threading.current_thread() is threading.main_thread()):
        yield
        return
    old = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR1, old)


@contextlib.contextmanager
def _no_requeue_signal():
    """SIGUSR1 waits while a cell's line is written (so a stop never falls inside the append)."""
    sig = getattr(signal, "SIGUSR1", None)
    if sig is None:
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {sig})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _on_requeue_signal(signum, _frame):
    """SLURM sends SIGUSR1 before the time limit: requeue this (array) task and stop; finished cells stay."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if job:
        try:
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
            result = f"exit {done.returncode} {done.stderr.strip()}".strip()
        except (OSError, subprocess.SubprocessError) as e:
            result = one_line(e)
        print(f"[sweep] signal {signum}: scontrol requeue {job}: {result}", file=sys.stderr, flush=True)
    print(f"[sweep] signal {signum}: stopping; rerun the same command to resume", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


def _done(sweep: Sweep) -> set[tuple[str, str]]:
    return {(e["cell"], e["config_hash"]) for e in read_table(sweep.out_dir)}


def list_cells(sweep: Sweep, array_count: int = 1) -> list[str]:
    """``index<TAB>array task<TAB>done|todo<TAB>cell key`` for every cell."""
    done = _done(sweep)
    return [f"{c.index}\t{c.index % array_count}\t{'done' if (c.key, cell_graph(sweep, c).key) in done else 'todo'}"
            f"\t{c.key}" for c in cells(sweep)]


def run(sweep: Sweep, array_index: int = 0, array_count: int = 1) -> Path:
    """Run the cells ≡ array_index (mod array_count) that the table lacks; returns the table's path."""
    import yaml
    from tqdm.auto import tqdm

    from experiments.run import ensure_base
    from modeling.version import code_version

    ensure_base(sweep.spec)
    out_dir = Path(sweep.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / CONFIG_COPY, yaml.safe_dump({**sweep.as_dict(), "code_version": code_version()},
                                                        sort_keys=False))
    all_cells = cells(sweep)
    with _locked(out_dir):
        done = _done(sweep)
    mine = [c for c in all_cells if c.index % array_count == array_index]
    todo = [c for c in mine if (c.key, cell_graph(sweep, c).key) not in done]
    part = f" (array task {array_index} of {array_count}: {len(mine)} cells)" if array_count > 1 else ""
    print(f"[sweep] {len(all_cells)} cells{part}; {len(mine) - len(todo)} already in {out_dir / TABLE}, "
          f"{len(todo)} to run", flush=True)
    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGUSR1, _on_requeue_signal) if main_thread and hasattr(signal, "SIGUSR1") else None
    progress = not (os.environ.get("CI") or os.environ.get("BADMERGING_JOB_WORKER"))
    try:
        with tqdm(todo, desc="sweep", unit="cell", dynamic_ncols=True, disable=not progress) as bar:
            for cell in bar:
                bar.set_postfix_str(cell.key, refresh=True)
                try:
                    entry = run_cell(sweep, cell, f"{array_index}/{array_count}", progress)
                except (ValueError, OSError, FloatingPointError) as e:
                    raise SweepError(f"cell {cell.key}: {one_line(e)}") from e
                with _no_requeue_signal():
                    _append(out_dir, entry)
    finally:
        if old is not None:
            signal.signal(signal.SIGUSR1, old)
    with _locked(out_dir):
        write_csv(out_dir)
    return out_dir / TABLE


def array_slice(index: int | None, count: int | None, environ: dict | None = None) -> tuple[int, int]:
    """(index, count) of this array task: the flags, else SLURM's array variables, else (0, 1)."""
    environ = os.environ if environ is None else environ
    if index is None and count is None and environ.get("SLURM_ARRAY_TASK_ID") and environ.get("SLURM_ARRAY_TASK_COUNT"):
        index = int(environ["SLURM_ARRAY_TASK_ID"]) - int(environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        count = int(environ["SLURM_ARRAY_TASK_COUNT"])
    if index is None and count is None:
        return 0, 1
    if index is None or count is None:
        raise SweepError("--array_index and --array_count go together; pass both (or neither, to run every cell)")
    if count < 1:
        raise SweepError(f"--array_count={count} must be >= 1 (the number of array tasks)")
    if not 0 <= index < count:
        raise SweepError(f"--array_index={index} must lie in [0, {count}) for --array_count={count}; "
                         "start the SLURM array at 0 (#SBATCH --array=0-N)")
    return index, count


def settings_from(values: Any) -> SweepSettings:
    """A SweepSettings from a mapping or namespace holding (at least) its fields."""
    get = values.get if isinstance(values, dict) else lambda k, d=None: getattr(values, k, d)
    defaults = SweepSettings()
    return SweepSettings(**{f.name: get(f.name, getattr(defaults, f.name)) for f in dataclasses.fields(SweepSettings)})
