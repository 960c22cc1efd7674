"""Sweeps: a grid of attack × merge method × coefficient × defense × seed, run cell by cell into one results table.

    python sweep.py --config configs/sweep/embedded_grid.yaml                 # every cell, locally (resumes)
    python sweep.py --config configs/sweep/embedded_grid.yaml --list          # the cells, numbered, and which are done
    python sweep.py --config configs/sweep/embedded_smoke.yaml --out_dir /tmp/smoke   # a reduced grid in minutes
    python sweep.py --config configs/sweep/embedded_grid.yaml --array_index 1 --array_count 4   # cells i ≡ 1 (mod 4)
    sbatch --array=0-7 scripts/slurm/sweep_array.sbatch configs/sweep/embedded_grid.yaml     # as a SLURM array

One cell = (attack, method, coefficient, defense, seed). For each cell the sweep makes sure its models exist —
the clean fine-tunes of every task and, for an attack, the attacker's backdoored fine-tune (with its stage-1
trigger) — through pipeline.py's ``train_job`` cache (keyed by recipe, so a rerun or another array task reuses
them), then merges them with merge.py's code (the attack's model plus the clean models of the other tasks, or
all clean models for attack ``none``), passing the defense preset's extra merge.py arguments, and evaluates.
The seed is ``--seed_everything`` and ``--data.seed`` of every training of the cell (the data seed draws the
renders and the shuffling order; the models start from θ_pre, so it is what makes two seeds differ).

The table is ``<out_dir>/results.jsonl``: one JSON line per finished cell (cell key, the five axes, the
cell's config hash and recipe, code version, models, and ``rows`` — merge.py's rows of the merged model),
appended whole with fsync under a file lock, so a killed sweep leaves no partial cell and concurrent array
tasks never interleave. ``results.csv`` (one line per row) is regenerated from it after every cell, and the
resolved config is saved as ``sweep_config.yaml``. A cell whose key and config hash are already in the table
is skipped: rerun the same command to resume. Changing a recipe (train or merge arguments, a config file)
changes the hash, so those cells run again and are appended beside the old ones.

Bad input stops before any work with exit status 2 and one line ``sweep.py: error: ...`` naming the input and
the fix (``BADMERGING_TRACEBACK=1`` shows the traceback); see ERRORS.md. SIGUSR1 (SLURM's
``--signal=SIGUSR1@90``) requeues the array task (``scontrol requeue``) and stops at once; finished cells
are kept and the requeued task skips them.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import hashlib
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
from dataclasses import dataclass
from pathlib import Path

import yaml

import pipeline

TOP_KEYS = ("out_dir", "train_dir", "cache_dir", "tasks", "grid", "methods", "defenses", "train_args", "trigger_args",
            "merge_args")
GRID_KEYS = ("attacks", "methods", "coefficients", "defenses", "seeds")


def seed_flags(seed: int) -> list[str]:
    """train.py arguments of a cell's seed: the global seed and the data seed (renders, shuffling)."""
    return ["--seed_everything", str(seed), "--data.seed", str(seed)]
METHOD_KEYS = ("method", "hparams")
RESERVED_MERGE_FLAGS = ("config", "models", "out_dir", "plan", "method", "coefficients", "hparams", "select_on",
                        "export", "evaluate", "zero_shot", "cache_dir")  # set by the sweep for every cell
NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
TABLE, CSV, CONFIG_COPY, LOCK = "results.jsonl", "results.csv", "sweep_config.yaml", ".results.lock"


class SweepError(ValueError):
    """Bad sweep input: the message names the input and the fix."""


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


# -- the config: read, check everything before any work, resolve ---------------------------------------------------
def _load_yaml(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise SweepError(f"--config {path}: file not found; check the path (configs/sweep/ holds the shipped ones)")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise SweepError(f"--config {path}: malformed YAML{where} ({getattr(e, 'problem', None) or type(e).__name__}); "
                         "fix the file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SweepError(f"--config {path}: unreadable ({_one_line(e)}); check the file") from None
    if not isinstance(data, dict):
        raise SweepError(f"--config {path}: holds a {type(data).__name__}, not a mapping of settings; "
                         "see configs/sweep/embedded_grid.yaml for the format")
    return data


def _unknown_keys(where: str, given: dict, known, what: str) -> None:
    unknown = [k for k in given if k not in known]
    if unknown:
        raise SweepError(f"{where}: unknown key {unknown[0]!r}{what}; fix its spelling or remove it "
                         f"(known: {', '.join(known)})")


def _str_list(where: str, key: str, value, allow_empty: bool = True) -> list[str]:
    if value is None and allow_empty:
        return []
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
        raise SweepError(f"{where}: {key} must be a list of strings, got {value!r}")
    return [str(v) for v in value]


def _axis(where: str, grid: dict, key: str, default=None) -> list:
    values = grid.get(key, default)
    if values is None or (isinstance(values, list) and not values):
        raise SweepError(f"{where}: grid.{key} is empty; list at least one value (the grid is the product of its axes, "
                         "so an empty axis leaves no cell)")
    if not isinstance(values, list):
        values = [values]
    for v in values:
        if values.count(v) > 1:
            raise SweepError(f"{where}: grid.{key} lists {v!r} twice; list each value once")
    return values


def _merge_parser_accepts(where: str, what: str, args: list[str]) -> None:
    """merge.py's own parser accepts ``args`` (unknown options, bad values), and they leave the sweep's flags alone."""
    import merge

    for a in args:
        flag = a[2:].split("=", 1)[0] if a.startswith("--") else None
        if flag in RESERVED_MERGE_FLAGS:
            raise SweepError(f"{where}: {what} sets --{flag}, which the sweep sets for every cell; remove it")
    parser = merge.build_parser()
    parser.exit_on_error = False
    try:
        parser.parse_args(["--models", "model.safetensors", *args])
    except argparse.ArgumentError as e:
        raise SweepError(f"{where}: {what}: merge.py rejects {args}: {merge._parse_error_line(e)}") from None


def _check_writable(path: str, key: str) -> None:
    """``path`` is a directory or can be created as one, without creating anything."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise SweepError(f"{key} {p} is a file, not a directory; set {key} in the config or pass --{key} to another place")
    probe = p
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise SweepError(f"{key} {p} cannot be created: {probe} is a file, not a directory; "
                         f"set {key} in the config (or pass --{key}) to a writable place")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SweepError(f"{key} {p} is not writable ({probe} refuses writes); set {key} in the config "
                         f"(or pass --{key}) to a writable place")


def load_config(path: str, out_dir: str | None = None) -> dict:
    """The resolved sweep config (defaults filled in), or a SweepError naming the bad input and the fix."""
    import merge
    from datamodules.tasks import get_task
    from merging.methods import MERGE_METHODS

    raw = _load_yaml(path)
    where = path
    _unknown_keys(where, raw, TOP_KEYS, "")
    grid = raw.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise SweepError(f"{where}: grid is empty or missing; give grid: {{attacks: [...], methods: [...], "
                         "coefficients: [...]}} (defenses and seeds default to [none] and [0])")
    _unknown_keys(where, grid, GRID_KEYS, " under grid")

    tasks = _str_list(where, "tasks", raw.get("tasks", pipeline.DEFAULT_TASKS))
    if not tasks:
        raise SweepError(f"{where}: tasks is empty; list the tasks to merge, e.g. [{', '.join(pipeline.DEFAULT_TASKS)}]")
    for t in tasks:
        try:
            get_task(t)
        except ValueError as e:
            raise SweepError(f"{where}: tasks: {_one_line(e)}") from None
        if tasks.count(t) > 1:
            raise SweepError(f"{where}: tasks lists {t!r} twice; list each task once")

    attacks = [str(a) for a in _axis(where, grid, "attacks")]
    known_attacks = ["none", *pipeline.ATTACKS]
    for a in attacks:
        if a not in known_attacks:
            raise SweepError(f"{where}: grid.attacks: unknown attack {a!r}; choose from {', '.join(known_attacks)}")
    if any(a != "none" for a in attacks) and pipeline.ATTACKER_TASK not in tasks:
        raise SweepError(f"{where}: the attacks fine-tune {pipeline.ATTACKER_TASK}, which tasks lacks; add it to tasks "
                         "or keep only 'none' in grid.attacks")

    coefficients = []
    for c in _axis(where, grid, "coefficients"):
        if isinstance(c, bool) or not isinstance(c, (int, float)):
            raise SweepError(f"{where}: grid.coefficients: {c!r} is not a number; give merge coefficients λ such as 0.3")
        if not math.isfinite(c):
            raise SweepError(f"{where}: grid.coefficients: {c!r} is not finite; give finite merge coefficients λ such as 0.3")
        if c < 0:
            raise SweepError(f"{where}: grid.coefficients: {c!r} is negative; give coefficients λ >= 0 "
                             "(task negation is not a merge of this sweep: run merge.py for it)")
        coefficients.append(float(c))

    seeds = _axis(where, grid, "seeds", [0])
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise SweepError(f"{where}: grid.seeds: {s!r} is not a non-negative integer; give seeds such as [0, 1]")

    defined = raw.get("methods") or {}
    if not isinstance(defined, dict):
        raise SweepError(f"{where}: methods must map names to {{method: ..., hparams: {{...}}}}, got {defined!r}")
    builtin = [*MERGE_METHODS, *merge.DATA_METHODS]
    methods = {}
    for name in map(str, _axis(where, grid, "methods")):
        if name in defined:
            entry = defined[name]
            if not isinstance(entry, dict) or not entry.get("method"):
                raise SweepError(f"{where}: methods.{name} must be a mapping with a method, e.g. "
                                 "{method: ties, hparams: {k: 20}}")
            _unknown_keys(where, entry, METHOD_KEYS, f" under methods.{name}")
            method, hparams = str(entry["method"]), entry.get("hparams") or {}
        else:
            method, hparams = name, {}
        if method not in builtin:
            raise SweepError(f"{where}: {'methods.' + name if name in defined else 'grid.methods'}: unknown merge method "
                             f"{method!r}; use one of {', '.join(builtin)} or a name defined under methods:")
        if not NAME.match(name):
            raise SweepError(f"{where}: method name {name!r} may hold only letters, digits and _ . + -; rename it")
        entry = {"name": name, "method": method, "hparams": hparams}
        try:
            merge.validate_entry({**entry, "coefficients": coefficients}, len(tasks))
        except ValueError as e:
            message = _one_line(e)
            message = message[len(name) + 2:] if message.startswith(f"{name}: ") else message
            raise SweepError(f"{where}: methods.{name}: {message}") from None
        methods[name] = entry

    presets = raw.get("defenses") or {}
    if not isinstance(presets, dict):
        raise SweepError(f"{where}: defenses must map preset names to lists of merge.py arguments "
                         f"(none: []), got {presets!r}")
    presets = {"none": [], **{str(k): v for k, v in presets.items()}}
    defenses = {}
    for name in map(str, _axis(where, grid, "defenses", ["none"])):
        if name not in presets:
            raise SweepError(f"{where}: grid.defenses: unknown defense {name!r}; define it under defenses: as "
                             f"{name}: [extra merge.py arguments], or use one of {', '.join(presets)}")
        if not NAME.match(name):
            raise SweepError(f"{where}: defense name {name!r} may hold only letters, digits and _ . + -; rename it")
        args = _str_list(where, f"defenses.{name}", presets[name])
        _merge_parser_accepts(where, f"defenses.{name}", args)
        defenses[name] = args

    train_args = _str_list(where, "train_args", raw.get("train_args"))
    trigger_args = _str_list(where, "trigger_args", raw.get("trigger_args"))
    merge_args = _str_list(where, "merge_args", raw.get("merge_args"))
    _merge_parser_accepts(where, "merge_args", merge_args)

    cfg = {"source": str(path),
           "out_dir": str(out_dir or raw.get("out_dir") or f"outputs/sweep/{Path(path).stem}"),
           "cache_dir": str(raw.get("cache_dir") or ".cache/badmerging"),
           "tasks": tasks, "grid": {"attacks": attacks, "methods": list(methods), "coefficients": coefficients,
                                    "defenses": list(defenses), "seeds": seeds},
           "methods": methods, "defenses": defenses,
           "train_args": train_args, "trigger_args": trigger_args, "merge_args": merge_args}
    cfg["train_dir"] = str(raw.get("train_dir") or cfg["out_dir"])
    for key in ("out_dir", "train_dir", "cache_dir"):
        _check_writable(cfg[key], key)
    return cfg


def cells(cfg: dict) -> list[Cell]:
    """Every cell, in a fixed order (seed, attack, method, coefficient, defense); methods without a coefficient
    (weight_average, RegMean, AdaMerging) take one cell with coefficient None."""
    import merge
    from merging.methods import method_hyperparameters

    out = []
    g = cfg["grid"]
    for seed, attack, method in itertools.product(g["seeds"], g["attacks"], g["methods"]):
        entry = cfg["methods"][method]
        fixed = entry["method"] in merge.DATA_METHODS or "coefficient" not in method_hyperparameters(entry["method"])
        for coef, defense in itertools.product([None] if fixed else g["coefficients"], g["defenses"]):
            out.append(Cell(len(out), attack, method, coef, defense, seed))
    return out


def _sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def recipe(cfg: dict, cell: Cell) -> dict:
    """Everything that decides a cell's numbers; its hash is the cell's config hash."""
    from datamodules.synthetic import TASK_VERSIONS
    from modeling.clip import EMBEDDED_WEIGHTS

    attack = None
    if cell.attack != "none":
        config, trig = pipeline.ATTACKS[cell.attack]
        attack = {"name": cell.attack, "configs": {c: _sha(c) for c in (pipeline.INJECTION_CONFIG, config)},
                  "trigger": None if trig is None else {"name": trig, "config": {pipeline.TRIGGER_CONFIGS[trig]:
                                                                                 _sha(pipeline.TRIGGER_CONFIGS[trig])},
                                                        "args": cfg["trigger_args"]}}
    return {"tasks": cfg["tasks"], "seed": cell.seed, "attack": attack,
            "finetune_config": {pipeline.FINETUNE_CONFIG: _sha(pipeline.FINETUNE_CONFIG)},
            "train_args": cfg["train_args"], "method": cfg["methods"][cell.method], "coefficient": cell.coefficient,
            "defense": {"name": cell.defense, "args": cfg["defenses"][cell.defense]}, "merge_args": cfg["merge_args"],
            "base_weights": _sha(EMBEDDED_WEIGHTS), "task_versions": {t: TASK_VERSIONS.get(t) for t in cfg["tasks"]}}


def config_hash(rec: dict) -> str:
    return hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()[:16]


# -- the table: one JSON line per cell, appended whole under a lock ----------------------------------------------------
@contextlib.contextmanager
def _locked(path: Path, shared: bool = False):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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
    with _locked(out_dir / LOCK):
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
    from merge import attack_label

    entries = read_table(out_dir)
    tasks = list(dict.fromkeys(t for e in entries for r in e["rows"] for t in r["clean_acc"]))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["cell", "attack", "method", "coefficient", "defense", "seed", "trigger", "in_merge", "mean_clean_acc",
                "normalized_acc", "asr", "ra", "clean_to_target", "asr_hits", "asr_total", *[f"acc_{t}" for t in tasks],
                "merge_defense", "config_hash", "code_version"])
    for e in entries:
        for r in e["rows"]:
            a = r["attack"]
            w.writerow([e["cell"], e["attack"], e["method"], e["coefficient"], e["defense"], e["seed"],
                        attack_label(a).replace(" (not merged)", ""), None if isinstance(a, str) else a.get("in_merge"),
                        r["mean_clean_acc"], r["normalized_acc"], r.get("asr"), r.get("ra"), r.get("clean_to_target"),
                        r.get("asr_hits"), r.get("asr_total"), *[r["clean_acc"].get(t) for t in tasks],
                        r.get("defense"), e["config_hash"], e["code_version"]])
    tmp = out_dir / f".{CSV}.tmp{os.getpid()}"
    tmp.write_text(buf.getvalue())
    os.replace(tmp, out_dir / CSV)
    return out_dir / CSV


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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


# -- running cells ---------------------------------------------------------------------------------------------------
class Models:
    """The trained models of the sweep, through pipeline.train_job's recipe cache; one array task trains a model
    while the others wait on its lock and then find it cached."""

    def __init__(self, cfg: dict):
        self.cfg, self.paths = cfg, {}
        self.root = Path(cfg["train_dir"])

    def _train(self, kind: str, name: str, task: str, configs: list[str], extra: list[str], trigger: str | None = None) -> str:
        if name not in self.paths:
            with _locked(self.root / ".locks" / f"{name}.lock"), _requeue_signal_to_lightning():
                self.paths[name] = pipeline.train_job(kind, name, task, configs, extra, str(self.root),
                                                      self.cfg["cache_dir"], trigger)
        return self.paths[name]

    def clean(self, task: str, seed: int) -> str:
        return self._train("finetune", f"{task}_seed{seed}", task, [pipeline.FINETUNE_CONFIG],
                           [*self.cfg["train_args"], *seed_flags(seed)])

    def attack(self, attack: str, seed: int) -> str:
        config, trig = pipeline.ATTACKS[attack]
        trigger = None
        if trig is not None:
            victim = pipeline.TRIGGER_VICTIMS[trig]
            trigger = self._train("trigger", f"trigger_{trig}_seed{seed}", victim, [pipeline.TRIGGER_CONFIGS[trig]],
                                  [*self.cfg["trigger_args"], *seed_flags(seed)])
        return self._train("finetune", f"attack_{attack}_seed{seed}", pipeline.ATTACKER_TASK,
                           [pipeline.INJECTION_CONFIG, config], [*self.cfg["train_args"], *seed_flags(seed)],
                           trigger)

    def for_cell(self, cell: Cell) -> list[str]:
        """The attack's model plus the clean models of the other tasks, or every clean model for attack none."""
        tasks = self.cfg["tasks"]
        if cell.attack == "none":
            return [self.clean(t, cell.seed) for t in tasks]
        return [self.attack(cell.attack, cell.seed)] + [self.clean(t, cell.seed) for t in tasks
                                                         if t != pipeline.ATTACKER_TASK]


def run_cell(cfg: dict, cell: Cell, models: Models, array: str = "0/1") -> dict:
    """Train what the cell needs, merge and evaluate it; returns its table line."""
    from modeling.version import code_version

    t0 = time.time()
    rec = recipe(cfg, cell)
    paths = models.for_cell(cell)
    entry = cfg["methods"][cell.method]
    plan = [{**entry, "coefficients": [cell.coefficient]}]
    out = Path(cfg["out_dir"]) / "cells" / cell.dirname
    args = ["--models", *paths, "--out_dir", str(out), "--plan", json.dumps(plan), "--zero_shot", "false",
            "--cache_dir", cfg["cache_dir"], *cfg["merge_args"], *cfg["defenses"][cell.defense]]
    rows = pipeline.merge_job("clean" if cell.attack == "none" else cell.attack, args)
    rows = [r for r in rows if r["merge"] not in ("individual", "zero-shot")]  # the merged model's rows
    return {"cell": cell.key, "attack": cell.attack, "method": cell.method, "coefficient": cell.coefficient,
            "defense": cell.defense, "seed": cell.seed, "config_hash": config_hash(rec), "code_version": code_version(),
            "seconds": round(time.time() - t0, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "array_task": array,
            "models": paths, "recipe": rec, "rows": rows}


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
            result = _one_line(e)
        print(f"[sweep] signal {signum}: scontrol requeue {job}: {result}", file=sys.stderr, flush=True)
    print(f"[sweep] signal {signum}: stopping; rerun the same command to resume", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


def run(cfg: dict, array_index: int = 0, array_count: int = 1) -> Path:
    """Run the cells ≡ array_index (mod array_count) that the table lacks; returns the table's path."""
    from tqdm.auto import tqdm

    from modeling.version import code_version

    out_dir = Path(cfg["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(out_dir / CONFIG_COPY, yaml.safe_dump({**cfg, "code_version": code_version()}, sort_keys=False))
    all_cells = cells(cfg)
    with _locked(out_dir / LOCK, shared=True):
        done = {(e["cell"], e["config_hash"]) for e in read_table(out_dir)}
    mine = [c for c in all_cells if c.index % array_count == array_index]
    todo = [c for c in mine if (c.key, config_hash(recipe(cfg, c))) not in done]
    part = f" (array task {array_index} of {array_count}: {len(mine)} cells)" if array_count > 1 else ""
    print(f"[sweep] {len(all_cells)} cells{part}; {len(mine) - len(todo)} already in {out_dir / TABLE}, "
          f"{len(todo)} to run", flush=True)
    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGUSR1, _on_requeue_signal) if main_thread and hasattr(signal, "SIGUSR1") else None
    models = Models(cfg)
    try:
        with tqdm(todo, desc="sweep", unit="cell", dynamic_ncols=True) as bar:
            for cell in bar:
                bar.set_postfix_str(cell.key, refresh=True)
                try:
                    entry = run_cell(cfg, cell, models, f"{array_index}/{array_count}")
                except (ValueError, OSError, FloatingPointError) as e:
                    raise SweepError(f"cell {cell.key}: {_one_line(e)}") from e
                with _no_requeue_signal():
                    _append(out_dir, entry)
    finally:
        if old is not None:
            signal.signal(signal.SIGUSR1, old)
    with _locked(out_dir / LOCK):
        write_csv(out_dir)
    return out_dir / TABLE


# -- command line ----------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise SweepError(f"{message}; see sweep.py --help")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sweep.py", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="the sweep YAML (configs/sweep/)")
    p.add_argument("--out_dir", default=None, help="overrides the config's out_dir")
    p.add_argument("--array_index", type=int, default=None,
                   help="run only cells with index ≡ array_index (mod array_count); default: $SLURM_ARRAY_TASK_ID")
    p.add_argument("--array_count", type=int, default=None, help="default: $SLURM_ARRAY_TASK_COUNT")
    p.add_argument("--list", action="store_true", help="print the cells (index, done or not, key) and exit")
    return p


def _array(a) -> tuple[int, int]:
    index, count = a.array_index, a.array_count
    if index is None and count is None and os.environ.get("SLURM_ARRAY_TASK_ID") and os.environ.get("SLURM_ARRAY_TASK_COUNT"):
        index = int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        count = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
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


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv=None) -> int:
    """``python sweep.py``: exit status 0, or 2 with one line ``sweep.py: error: ...`` on stderr for bad input."""
    try:
        a = build_parser().parse_args(argv)
        index, count = _array(a)
        cfg = load_config(a.config, a.out_dir)
        if a.list:
            done = {(e["cell"], e["config_hash"]) for e in read_table(cfg["out_dir"])}
            for c in cells(cfg):
                mark = "done" if (c.key, config_hash(recipe(cfg, c))) in done else "todo"
                print(f"{c.index}\t{c.index % count}\t{mark}\t{c.key}")
            return 0
        path = run(cfg, index, count)
    except (ValueError, OSError, FloatingPointError) as e:
        if os.environ.get("BADMERGING_TRACEBACK"):
            raise
        print(f"sweep.py: error: {_one_line(e)}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
