"""The one in-process merge-evaluation API: models, merge plan, probes, defenses -> result rows.

    request = MergeEvalRequest(models=[...], plan=[PlanEntry("ties", coefficients=[0.3], hparams={"k": 20})],
                               defenses=[defenses.defense_setting("ibvs", {"clean": c, "backdoored": b}, [0.5, 1])])
    result = evaluate_merges(request)          # validates every input first, then merges and evaluates
    write_results(out_dir, config, result.rows, result.eval_tasks)

Rows, in this order: ``individual`` (each model on its own task; each backdoored model's trigger on it),
``zero-shot`` (θ_pre), then per plan entry and coefficient λ the merge, then the merge under every
defense strength. Every model row is followed by one row per trigger measured on it: the triggers of the
backdoored models in the merge, of ``probe_models`` (measured, not merged) and ``probe_triggers``
(inherent triggers); a plan entry with ``measure_attacks: merged`` measures only the first kind, ``false`` none.
``select_on: val`` keeps the λ with the best mean normalised accuracy on the val
split; a defense with ``select: val`` marks the largest strength whose mean val accuracy drops at most
``max_drop`` below the undefended merge (clean data only); with ``report: selected`` only that strength is
measured on ``eval_split`` (every strength is scored on val). Rows are measured on ``eval_split``.
``MergeEvalResult.timing`` holds the seconds, calls and encoder inputs of each stage (``StageTimer``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from evaluation.evaluate import AttackProbe, EvalTask, evaluate, load_eval_tasks
from evaluation.inputs import attack_probe, check_base, model_metadata, model_tasks, task_of, trigger_probes, unique_labels
from evaluation.merge_methods import (MergeContext, MergeMethod, check_finite, check_positive_int,
                                      check_scaling_hyperparameters, resolve_merge_method)
from evaluation.rows import Row, attack_rows, make_row
from merging.io import (MergeInputError, SafetensorsReader, check_output_path, file_problem, load_metadata,
                        load_state_dict, save_state_dict)
from merging.streaming import first_non_finite, validate_inputs
from merging.task_vectors import narrowest_float, task_vector
from modeling.clip import EMBEDDED_MODEL, BaseModel, load_base_model
from modeling.version import code_version

__all__ = ["ENGINES", "check_defense_report", "DefenseLike", "DefenseSetting", "EvalCache", "MergeEvalRequest", "MergeEvalResult", "PlanEntry",
           "check_merged_finite", "evaluate_merges", "hyperparameters_at", "validate_plan_entry",
           "validate_request", "weights_dtype"]

ENGINES = ("auto", "memory", "streaming")
StateDict = dict[str, torch.Tensor]


@dataclass
class PlanEntry:
    """One merge method of a run: ``method`` (registered name, import path or {class_path, init_args}), the λ values,
    other hyperparameters, λ selection, whether triggers are measured on it and whether the defenses apply."""

    method: Any = "task_arithmetic"
    name: str | None = None  # the rows' ``merge``; default: the method as given
    coefficients: Any = None  # None: the method's default λ (or a method without λ)
    hparams: Any = field(default_factory=dict)
    select_on: str | None = None  # "val": keep the λ with the best mean normalised val accuracy
    measure_attacks: Any = True  # True: every probe; "merged": only the triggers of the models in the merge; False: none
    defend: bool = True

    def __post_init__(self):
        if self.hparams is None:
            self.hparams = {}

    @classmethod
    def from_mapping(cls, entry: Any) -> "PlanEntry":
        if isinstance(entry, PlanEntry):
            return entry
        if not isinstance(entry, Mapping) or not entry.get("method"):
            raise MergeInputError(f"--plan entry {entry!r} names no method; give each entry a 'method'")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(map(str, entry)) - set(known))
        if unknown:
            raise MergeInputError(f"--plan entry {dict(entry)!r}: unknown key(s) {unknown}; an entry takes {known}")
        return cls(**entry)

    def label(self, method: MergeMethod) -> str:
        """The name rows carry: ``name``, else the method as given (its registered name for a class spec)."""
        return self.name or (self.method if isinstance(self.method, str) else method.name)

    def coefficient_list(self) -> list:
        return [None] if self.coefficients is None else self.coefficients


class DefenseLike(Protocol):
    """What the evaluation needs of a defense (``defenses.Defense`` implements it)."""

    name: str

    def validate(self, setting: "DefenseSetting") -> None: ...
    def prepare(self, context: MergeContext, inputs: dict[str, str]) -> None: ...
    def apply(self, merged: StateDict, strength: float) -> StateDict: ...
    def select_strength(self, scores: dict[float, float], reference: float, max_drop: float) -> float: ...
    def selection_rule(self, max_drop: float) -> str: ...
    def describe(self, strength: float, inputs: dict[str, str]) -> dict: ...


@dataclass
class DefenseSetting:
    """A defense applied to every merge: its named input models (paths), the strengths evaluated, and the rule that
    marks one strength on clean val data (``select: val``, ``max_drop``). Build one with ``defenses.defense_setting``.

    ``sources`` names where a value came from, for messages (e.g. ``{"strengths": "--ibvs_alphas"}``).
    """

    defense: DefenseLike
    inputs: dict[str, str | None] = field(default_factory=dict)
    strengths: Sequence[float] = (1.0,)
    select: str | None = "val"
    max_drop: float = 0.02
    sources: dict[str, str] = field(default_factory=dict)
    report: str = "all"  # the strengths measured on the report split: "all", or "selected" (the one select marks)

    def where(self, key: str) -> str:
        return self.sources.get(key, key)

    def unique_strengths(self) -> list[float]:
        return list(dict.fromkeys(self.strengths))


@dataclass
class MergeEvalRequest:
    """Everything one merge evaluation needs; field names follow merge.py's flags."""

    models: list[str]
    plan: list[PlanEntry] = field(default_factory=lambda: [PlanEntry()])
    tasks: list[str] | None = None  # task of each model (default: from its metadata)
    eval_tasks: list[str] | None = None  # default: the models' tasks (+ every trigger's target task)
    probe_models: list[str] = field(default_factory=list)
    probe_triggers: list[str] = field(default_factory=list)
    defenses: list[DefenseSetting] = field(default_factory=list)
    zero_shot: bool = True
    individual: bool = True
    evaluate: bool = True  # False: only merge (and export)
    model_name: str = EMBEDDED_MODEL
    pretrained: str | None = None
    cache_dir: str = ".cache/badmerging"
    data_dirs: dict[str, str] = field(default_factory=dict)
    batch_size: int = 512
    device: str = "cpu"
    synthetic_train_size: int = 40000
    synthetic_test_size: int = 1000
    val_max_examples: int | None = 500
    gram_batch_size: int = 128
    engine: str = "auto"
    merge_threads: int | None = None
    export: str | None = None  # write the merged (and defended) weights here: one plan entry, one λ
    eval_split: str = "test"  # "val": rows measured on the first val_max_examples val images per task

    def __post_init__(self):
        self.plan = [PlanEntry.from_mapping(e) for e in self.plan]


@dataclass
class MergeEvalResult:
    rows: list[Row]
    eval_tasks: list[str]  # the tasks of every row's clean_acc, in table order
    tasks: list[str]  # the task of each model
    timing: dict[str, float] = field(default_factory=dict)  # seconds per stage (see ``StageTimer``)


class StageTimer:
    """Wall seconds summed per stage name: ``with timer("merge/ties"): ...``. Stages nest; an inner stage's time
    is also counted in the outer one, so report leaves (``decode/*``, ``merge/*``, ``evaluate/*``, ...)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.images: dict[str, int] = {}  # encoder inputs (images × views) per evaluate/* stage

    def __call__(self, stage: str):
        import contextlib
        import time

        @contextlib.contextmanager
        def timed():
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0
                self.counts[stage] = self.counts.get(stage, 0) + 1
        return timed()

    def summary(self) -> dict[str, dict]:
        return {k: {"seconds": round(v, 3), "count": self.counts[k], **({"images": self.images[k]} if k in self.images else {})}
                for k, v in sorted(self.seconds.items())}


def hyperparameters_at(method: MergeMethod, given: Mapping, coefficient, recorded: bool = False) -> dict:
    """The hyperparameters a merge gets at λ = ``coefficient`` (``recorded``: the ones its row records)."""
    defaults = method.defaults()
    base = {} if recorded and not method.records_defaults else defaults
    hp = {**base, **given}
    if coefficient is not None and "coefficient" in defaults:
        hp["coefficient"] = coefficient
    return hp


def validate_plan_entry(entry: PlanEntry | Mapping, n_models: int, dtype: torch.dtype = torch.float32) -> MergeMethod:
    """One plan entry's method, hyperparameters and coefficients (each λ), before any work; returns its method.

    Coefficients and the other hyperparameters that scale weights must be finite in ``dtype``, the dtype of the
    weights they scale (``validate_request`` passes the models'; float32, what train.py exports, otherwise)."""
    entry = PlanEntry.from_mapping(entry)
    method = resolve_merge_method(entry.method)
    name = entry.label(method)
    if not isinstance(entry.hparams, Mapping):
        raise MergeInputError(f"{name}: hparams={entry.hparams!r} must be a mapping such as {{k: 20}}")
    coefficients = entry.coefficient_list()
    if not isinstance(coefficients, (list, tuple)) or not coefficients:
        raise MergeInputError(f"{name}: coefficients={coefficients!r} must be a non-empty list of numbers")
    coefficients = [None if c is None else check_finite(name, "coefficient", c, dtype) for c in coefficients]
    if entry.select_on not in (None, "val"):
        raise MergeInputError(f"{name}: select_on must be 'val' or null, got {entry.select_on!r}")
    if entry.measure_attacks not in (True, False, "merged"):
        raise MergeInputError(f"{name}: measure_attacks must be true, false or 'merged' (only the merged models' "
                              f"triggers), got {entry.measure_attacks!r}")
    for c in coefficients if method.takes_coefficient else [None]:
        hparams = hyperparameters_at(method, entry.hparams, c)
        method.validate(hparams, n_models, name)
        check_scaling_hyperparameters(method, hparams, name, dtype)
    return method


def weights_dtype(paths: Sequence[str]) -> torch.dtype:
    """The narrowest float dtype in the models' safetensors headers (float32 if none): the dtype coefficients must
    be finite in. A file whose header cannot be read is skipped here; its own check names it later."""
    dtypes = set()
    for path in paths:
        try:
            with SafetensorsReader(path) as reader:
                dtypes.update(reader.dtype(k) for k in reader.keys())
        except MergeInputError:
            continue
    return narrowest_float(dtypes)


def _check_model_files(flag: str, paths: Sequence[str]) -> None:
    seen: dict[str, str] = {}
    for path in paths:
        problem = file_problem(path)  # stat only: a FIFO is never opened
        if problem == "is a directory":
            raise MergeInputError(f"{flag}: {path} is a directory; pass the exported .safetensors file in it")
        if problem is not None:
            raise MergeInputError(f"{flag}: {path} {problem}; pass exported encoders (.safetensors)")
        real = os.path.realpath(path)
        if real in seen:
            raise MergeInputError(f"{flag}: {path} is given twice (also as {seen[real]}); list each model once")
        seen[real] = path


def _validate_defenses(settings: Sequence[DefenseSetting], dtype: torch.dtype) -> None:
    for s in settings:
        if not isinstance(s, DefenseSetting):
            raise MergeInputError(f"defenses: {s!r} is not a DefenseSetting; build each with defenses.defense_setting")
    names = [s.defense.name for s in settings]
    for s in settings:
        if names.count(s.defense.name) > 1:
            raise MergeInputError(f"defense {s.defense.name!r} is given {names.count(s.defense.name)} times; give it "
                                  "once with all its strengths")
        _validate_defense(s, dtype)


def check_defense_report(report: str, select: str | None, report_name: str = "report", select_name: str = "select") -> None:
    """``report`` is ``all`` (every strength on the report split) or ``selected`` (the one ``select: val`` marks)."""
    if report not in ("all", "selected"):
        raise MergeInputError(f"{report_name}={report!r}; use all (every strength on test) or selected")
    if report == "selected" and select != "val":
        raise MergeInputError(f"{report_name}: selected needs {select_name}: val (no strength is selected otherwise)")


def _validate_defense(setting: DefenseSetting, dtype: torch.dtype) -> None:
    if not isinstance(setting.strengths, (list, tuple)):
        raise MergeInputError(f"{setting.where('strengths')}={setting.strengths!r} must be a list of numbers")
    setting.defense.validate(setting)  # its inputs, then each strength
    if not setting.strengths:
        raise MergeInputError(f"{setting.where('strengths')} is empty; give at least one strength, e.g. 0.5 1 2")
    for strength in setting.strengths:  # a strength scales a vector of weights: finite in their dtype
        check_finite(setting.where("strengths"), "strength", strength, dtype)
    if setting.select not in (None, "val"):
        raise MergeInputError(f"{setting.where('select')} must be 'val' or null, got {setting.select!r}")
    check_defense_report(setting.report, setting.select, setting.where("report"), setting.where("select"))
    drop = setting.max_drop
    if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0 <= drop <= 1:
        raise MergeInputError(f"{setting.where('max_drop')}={drop!r} must be a fraction in [0, 1], e.g. 0.02")


def validate_request(request: MergeEvalRequest) -> list[MergeMethod]:
    """Every input that can be checked without loading weights, before any work; returns the plan's methods."""
    from datamodules.tasks import get_task

    r = request
    if not r.models:
        raise MergeInputError("no models given; pass --models a.safetensors b.safetensors ...")
    _check_model_files("--models", r.models)
    _check_model_files("--probe_models", r.probe_models or [])
    if r.tasks is not None and len(r.tasks) != len(r.models):
        raise MergeInputError(f"--tasks has {len(r.tasks)} entries for {len(r.models)} --models; give one task per model")
    for path in r.probe_triggers or []:
        if not Path(path).is_file():
            raise MergeInputError(f"--probe_triggers: {path} does not exist; pass a stage-1 trigger file (.safetensors)")
    dtype = weights_dtype(r.models)
    _validate_defenses(r.defenses, dtype)
    for task in list(r.tasks or []) + list(r.eval_tasks or []) + list((r.data_dirs or {}).keys()):
        get_task(task)  # UnknownTaskError lists the known tasks
    for task, folder in (r.data_dirs or {}).items():
        if not Path(folder).is_dir():
            raise MergeInputError(f"--data_dirs: {folder} (task {task}) is not a directory; pass the task's local data folder")
    if r.engine not in ENGINES:
        raise MergeInputError(f"--engine={r.engine!r} is unknown; use one of {', '.join(ENGINES)}")
    if r.eval_split not in ("test", "val"):
        raise MergeInputError(f"eval_split={r.eval_split!r} must be 'test' or 'val'")
    for flag in ("batch_size", "gram_batch_size", "synthetic_train_size", "synthetic_test_size"):
        check_positive_int(f"--{flag}", getattr(r, flag))
    check_positive_int("--val_max_examples", r.val_max_examples, allow_none=True)
    check_positive_int("--merge_threads", r.merge_threads, allow_none=True)
    methods = [validate_plan_entry(e, len(r.models), dtype) for e in r.plan]
    if r.export:
        if len(r.plan) != 1 or len(r.plan[0].coefficient_list()) != 1:
            raise MergeInputError("--export needs exactly one method and one coefficient; pass --coefficients λ")
        if len(r.defenses) > 1:
            raise MergeInputError(f"--export writes one model, but {len(r.defenses)} defenses are given; give at most one")
        check_output_path(r.export, "--export", is_dir=False)
    return methods


def check_merged_finite(state: StateDict, what: str, fix: str) -> StateDict:
    """``state`` unchanged if every float value is finite, else a MergeInputError naming ``what`` (the method and
    coefficient: finite λ·τ can still overflow) and the first non-finite key: a NaN merge is never evaluated or
    exported."""
    key = first_non_finite(state)
    if key is not None:
        raise MergeInputError(f"{what}: the merged weights are not finite (key {key!r} holds NaN or inf: the "
                              f"arithmetic overflowed {str(state[key].dtype).removeprefix('torch.')}); nothing was evaluated "
                              f"or exported: {fix}")
    return state


class EvalCache:
    """Loaded base models (θ_pre kept aside) and decoded evaluation data, reused across calls (MergeEvaluate)."""

    def __init__(self):
        self._bases: dict[tuple, tuple[BaseModel, StateDict]] = {}
        self._data: dict[tuple, EvalTask] = {}

    def base(self, model_name: str, pretrained: str | None) -> tuple[BaseModel, StateDict]:
        key = (model_name, pretrained)
        if key not in self._bases:
            base = load_base_model(model_name, pretrained, device="cpu")
            self._bases[key] = (base, base.encoder_state_dict())
        return self._bases[key]

    def tasks(self, names: Sequence[str], base: BaseModel, split: str, r: MergeEvalRequest) -> dict[str, EvalTask]:
        """Each task's ``split`` decoded once (test: all of it; val: the first ``val_max_examples``)."""
        max_examples = None if split == "test" else r.val_max_examples
        settings = (base.base_id, split, r.cache_dir, r.batch_size, r.synthetic_train_size, r.synthetic_test_size,
                    max_examples)
        missing = [n for n in names if (n, r.data_dirs.get(n), settings) not in self._data]
        if missing:
            loaded = load_eval_tasks(missing, base, split=split, cache_dir=r.cache_dir, data_dirs=r.data_dirs,
                                     batch_size=r.batch_size, synthetic_train_size=r.synthetic_train_size,
                                     synthetic_test_size=r.synthetic_test_size, max_examples=max_examples)
            self._data.update({(n, r.data_dirs.get(n), settings): t for n, t in loaded.items()})
        return {n: self._data[(n, r.data_dirs.get(n), settings)] for n in names}


def build_context(r: MergeEvalRequest, base: BaseModel, theta_pre: StateDict) -> MergeContext:
    """θ_pre, the models' tasks (checked), and their task vectors (or the files, for the streaming engine)."""
    from datamodules.tasks import get_task

    metas = [model_metadata(p) for p in r.models]
    given = r.tasks or [None] * len(r.models)
    tasks = [task_of(p, m, given[i]) for i, (p, m) in enumerate(zip(r.models, metas))]
    for p, t in zip(r.models, tasks):
        try:
            get_task(t)
        except ValueError as e:
            raise MergeInputError(f"{p}: {e}; pass --tasks to name its task") from None
    for p, m in zip(r.models, metas):
        check_base(p, m, base.base_id)
    total = sum(os.path.getsize(p) for p in r.models)
    streaming = r.engine == "streaming" or (r.engine == "auto" and total > (1 << 30))
    context = MergeContext(base, theta_pre, list(r.models), tasks, metas=metas, model_name=r.model_name,
                           pretrained=r.pretrained, cache_dir=r.cache_dir, data_dirs=dict(r.data_dirs), synthetic_train_size=r.synthetic_train_size,
                           synthetic_test_size=r.synthetic_test_size, gram_batch_size=r.gram_batch_size,
                           merge_threads=r.merge_threads)
    # Keys, shapes and dtypes against θ_pre, finite values, no model twice: before any merge or evaluation.
    if streaming:
        context.pretrained_path = _pretrained_file(base, theta_pre, r.cache_dir)
        validate_inputs(context.pretrained_path, r.models)
    else:
        validate_inputs(theta_pre, r.models, pretrained_name=f"θ_pre ({base.base_id})")
    model_tasks(r.models, metas, r.tasks)  # after the file checks: two distinct, valid models on one task
    if not streaming:
        context.vectors = [task_vector(load_state_dict(p), theta_pre)
                           for p in tqdm(r.models, desc="task vectors", leave=False)]
    return context


def _pretrained_file(base: BaseModel, theta_pre: StateDict, cache_dir: str) -> Path:
    """θ_pre as a safetensors file (cached), so the streaming engine can read it tensor by tensor."""
    key = base.base_id.replace("/", "_").replace("@", "-").replace(":", "-")
    path = Path(cache_dir) / "pretrained" / f"{key}.safetensors"
    if not path.exists():
        save_state_dict(path, theta_pre, {"kind": "pretrained", "base_model": base.describe()})
    return path


def _probes(r: MergeEvalRequest, context: MergeContext, base: BaseModel) -> tuple[list[AttackProbe], list[AttackProbe],
                                                                                  list[str | None]]:
    """(triggers of the backdoored models in the merge, of probe_models and probe_triggers, each model's probe name)."""
    labels = unique_labels(list(r.models) + list(r.probe_models))
    names = [labels[i] if m and m.get("attack") else None for i, m in enumerate(context.metas)]
    inside = [attack_probe(p, m, n, base.image_size) for p, m, n in zip(r.models, context.metas, names) if n]
    outside = []
    for i, path in enumerate(r.probe_models, start=len(r.models)):
        meta = load_metadata(path)
        if not meta or not meta.get("attack"):
            raise MergeInputError(f"--probe_models: {path} has no attack metadata; pass a BackdoorInjection export")
        check_base(path, meta, base.base_id)
        outside.append(attack_probe(path, meta, labels[i], base.image_size))
    return inside, outside + trigger_probes(r.probe_triggers, base.image_size), names


def evaluate_merges(request: MergeEvalRequest, cache: EvalCache | None = None) -> MergeEvalResult:
    """Validate ``request``, then merge, defend, export and evaluate as it says; the rows in table order."""
    methods = validate_request(request)
    cache = cache or EvalCache()
    base, theta_pre = cache.base(request.model_name, request.pretrained)
    timer = StageTimer()
    with timer("prepare"):
        run = _Run(request, methods, base, theta_pre, cache, timer)
    try:
        rows = run.rows()
    finally:
        base.model.visual.load_state_dict(theta_pre)  # a cached base stays θ_pre for the next call
    return MergeEvalResult(rows, run.eval_names, run.context.tasks, timer.summary())


class _Run:
    """One request's state: the context, probes, prepared defenses, decoded data and individual accuracies."""

    def __init__(self, request: MergeEvalRequest, methods: list[MergeMethod], base: BaseModel, theta_pre: StateDict,
                 cache: EvalCache, timer: StageTimer | None = None):
        self.r, self.methods, self.base, self.cache = request, methods, base, cache
        self.timer = timer or StageTimer()
        self.context = build_context(request, base, theta_pre)
        self.probes_in, probes_out, self.probe_names = _probes(request, self.context, base)
        self.probes = self.probes_in + probes_out
        self.in_merge = {p.name for p in self.probes_in}
        self.eval_names = list(request.eval_tasks or dict.fromkeys(self.context.tasks))
        self.eval_names += [t for t in dict.fromkeys(p.target_task for p in self.probes) if t not in self.eval_names]
        for setting in request.defenses:
            with self.timer(f"defense_prepare/{setting.defense.name}"):
                setting.defense.prepare(self.context, dict(setting.inputs))
        self.encoder = base.model.visual.to(request.device)
        self.individual: dict[str, dict[str, float]] = {}

    def evaluate(self, state: StateDict, split: str, probes: Sequence[AttackProbe] = (), names=None) -> tuple[dict, dict]:
        """(clean accuracy per task, {probe: rates}) of ``state`` on ``split`` ("report": the request's eval_split)."""
        split = self.r.eval_split if split == "report" else split
        with self.timer(f"decode/{split}"):
            data = self.cache.tasks(self.eval_names, self.base, split, self.r)
        self.encoder.load_state_dict(state)
        tasks_here = {n: t for n, t in data.items() if names is None or n in names}
        views = sum(t.size * (1 + sum(p.target_task == n for p in probes)) for n, t in tasks_here.items())
        self.timer.images[f"evaluate/{split}"] = self.timer.images.get(f"evaluate/{split}", 0) + views
        with self.timer(f"evaluate/{split}"):
            return evaluate(self.encoder, tasks_here, list(probes), self.r.device)

    def individual_on(self, split: str) -> dict[str, float]:
        """Each model's accuracy on its own task (the denominators of normalised accuracy)."""
        if split not in self.individual:
            self.individual[split] = {}
            for p, t in zip(self.r.models, self.context.tasks):
                if t in self.eval_names:
                    self.individual[split][t] = self.evaluate(load_state_dict(p), split, names={t})[0][t]
        return self.individual[split]

    def rows(self) -> list[Row]:
        rows: list[Row] = []
        if self.r.evaluate and self.r.individual:
            rows += self.individual_rows()
        if self.r.evaluate and self.r.zero_shot:
            accs, attacks = self.evaluate(self.context.theta_pre, "report", self.probes)
            row = make_row("zero-shot", None, accs, self.individual.get("report"))
            rows += [row] + attack_rows(row, attacks, self.probes, self.in_merge)
        for entry, method in zip(self.r.plan, self.methods):
            rows += self.entry_rows(entry, method)
        return rows

    def individual_rows(self) -> list[Row]:
        rows = [dataclasses.replace(make_row("individual", None, self.individual_on("report"), None), normalized_acc=1.0)]
        for p in self.probes_in:  # each backdoored model alone: its own task, its trigger on its target task
            path, own = next((m, t) for m, t, n in zip(self.r.models, self.context.tasks, self.probe_names) if n == p.name)
            accs, attacks = self.evaluate(load_state_dict(path), "report", [p], names={own, p.target_task})
            rows += attack_rows(make_row("individual", None, {own: accs[own]}, None), attacks, [p], self.in_merge)
        return rows

    def select_coefficient(self, entry: PlanEntry, method: MergeMethod, coefficients: list) -> dict:
        """The λ with the best mean normalised accuracy on the val split (over the merged models' tasks)."""
        ind_val = self.individual_on("val")
        scores = {}
        for c in tqdm(coefficients, desc=f"{entry.label(method)}: select λ on val", leave=False):
            merged = self.merge(entry, method, c)
            accs = self.evaluate(merged, "val")[0]
            scored = [t for t in accs if t in ind_val]  # a probe's target task outside the merge has no individual
            scores[c] = sum(accs[t] / ind_val[t] for t in scored) / len(scored)
        return {"split": "val", "metric": "mean normalized accuracy", "scores": scores,
                "chosen": max(scores, key=scores.get), "val_examples_per_task": self.r.val_max_examples}

    def merge(self, entry: PlanEntry, method: MergeMethod, coefficient) -> StateDict:
        """The merge at λ = ``coefficient``, checked finite before anything uses it."""
        with self.timer(f"merge/{method.name}"):
            merged = method.merge(self.context, **hyperparameters_at(method, entry.hparams, coefficient))
        return check_merged_finite(merged, self.what(entry, method, coefficient),
                                   "use a smaller coefficient" if coefficient is not None
                                   else "check the method's hyperparameters and input models")

    @staticmethod
    def what(entry: PlanEntry, method: MergeMethod, coefficient) -> str:
        """How messages name one merge: ``ties at coefficient=0.3`` (the method alone without λ)."""
        return entry.label(method) + ("" if coefficient is None else f" at coefficient={coefficient!r}")

    def defend(self, setting: DefenseSetting, merged: StateDict, strength: float, what: str) -> StateDict:
        """The defense at ``strength`` on a merge, checked finite before anything uses it."""
        with self.timer(f"defense_apply/{setting.defense.name}"):
            defended = setting.defense.apply(merged, strength)
        return check_merged_finite(defended, f"{what} under {setting.defense.name} strength {strength!r}",
                                   "use a smaller strength")

    def select_strength(self, setting: DefenseSetting, merged: StateDict, what: str) -> dict:
        """The defense's strength rule on clean val accuracy only (nothing of any attacker)."""
        def mean_val(state):
            accs = self.evaluate(state, "val")[0]
            return sum(accs.values()) / len(accs)

        reference = mean_val(merged)
        scores = {a: mean_val(self.defend(setting, merged, a, what)) for a in setting.unique_strengths()}
        chosen = setting.defense.select_strength(scores, reference, setting.max_drop)
        return {"split": "val", "rule": setting.defense.selection_rule(setting.max_drop), "undefended": reference,
                "scores": scores, "chosen": chosen}

    def entry_rows(self, entry: PlanEntry, method: MergeMethod) -> list[Row]:
        name = entry.label(method)
        coefficients = entry.coefficient_list() if method.takes_coefficient else [None]
        selection = None
        if entry.select_on == "val" and self.r.evaluate and len(coefficients) > 1:
            selection = self.select_coefficient(entry, method, coefficients)
            coefficients = [selection["chosen"]]
        settings = list(self.r.defenses) if entry.defend else []
        rows = []
        for c in tqdm(coefficients, desc=name, leave=False):
            merged = self.merge(entry, method, c)
            what = self.what(entry, method, c)
            recorded = {**hyperparameters_at(method, entry.hparams, c, recorded=True), **method.learned}
            chosen = {s.defense.name: self.select_strength(s, merged, what) for s in settings
                      if s.select == "val" and self.r.evaluate}
            if self.r.export:
                self.export(merged, self.method_label(entry, method), recorded, settings, chosen, what)
            if not self.r.evaluate:
                continue
            measured = (self.probes if entry.measure_attacks is True
                        else self.probes_in if entry.measure_attacks == "merged" else [])
            accs, attacks = self.evaluate(merged, "report", measured)
            row = make_row(name, c, accs, self.individual.get("report"))
            row = dataclasses.replace(row, method=self.method_label(entry, method), hyperparameters=recorded,
                                      selection=selection)
            rows += [row] + attack_rows(row, attacks, measured, self.in_merge)
            for s in settings:
                record = chosen.get(s.defense.name)
                reported = [record["chosen"]] if s.report == "selected" and record else s.unique_strengths()
                for a in reported:
                    state = self.defend(s, merged, a, what)
                    accs, attacks = self.evaluate(state, "report", measured)
                    drow = dataclasses.replace(make_row(name, c, accs, self.individual.get("report")),
                                               method=self.method_label(entry, method), hyperparameters=recorded,
                                               defense=s.defense.name, defense_alpha=a,
                                               defense_selected=record is not None and a == record["chosen"],
                                               defense_selection=record)
                    rows += [drow] + attack_rows(drow, attacks, measured, self.in_merge)
        return rows

    @staticmethod
    def method_label(entry: PlanEntry, method: MergeMethod) -> str:
        return entry.method if isinstance(entry.method, str) else method.name

    def export(self, merged: StateDict, method: str, hyperparameters: dict, settings: list[DefenseSetting],
               chosen: dict[str, dict], what: str) -> None:
        """The merged weights (under the defense at its selected strength, else its first one) with what made them."""
        r = self.r
        meta = {"kind": "merge", "method": method, "hyperparameters": hyperparameters, "models": [str(p) for p in r.models],
                "tasks": self.context.tasks, "base_model": self.base.describe(), "code_version": code_version()}
        state = merged
        for s in settings[:1]:
            record = chosen.get(s.defense.name)
            strength = record["chosen"] if record is not None else s.unique_strengths()[0]
            meta["defense"] = s.defense.describe(strength, dict(s.inputs))
            state = self.defend(s, merged, strength, what)
        save_state_dict(r.export, state, meta)
