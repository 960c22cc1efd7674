"""Merge methods on in-memory state dicts.

Each method is ``f(pretrained, vectors, **hyperparameters) -> merged state dict`` where ``pretrained``
is theta_pre (dict[str, Tensor]) and ``vectors`` are task vectors tau_t = theta_t - theta_pre (see
``task_vectors.task_vector``) over the float keys. Keys absent from the vectors (integer buffers,
frozen tensors) are copied from ``pretrained``; merged tensors keep pretrained's dtype and are on CPU.
Arithmetic runs in float32 (float64 for float64 models). The same plans run over files in
``streaming.merge_files``, chunk by chunk, with identical results.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Callable, Mapping, Sequence

import torch

from .engine import MergePlan, check_ties_trim, exact_thresholds, run_plan
from .io import MergeInputError
from .task_vectors import compute_dtype, is_mergeable

__all__ = [
    "MERGE_METHODS",
    "breadcrumbs",
    "build_plan",
    "consensus",
    "dare",
    "get_merge_method",
    "method_hyperparameters",
    "task_arithmetic",
    "ties_merge",
    "validate_vectors",
    "weight_average",
]

StateDict = Mapping[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# public methods (their signatures hold the defaults; build_plan reads them)
# ---------------------------------------------------------------------------------------------
def task_arithmetic(pretrained: StateDict, vectors: Sequence[StateDict], coefficient: float = 0.3):
    """Task Arithmetic: theta_pre + lam * sum_t tau_t (or theta_pre + sum_t lam_t tau_t for a list of lam_t)."""
    return _merge_in_memory("task_arithmetic", pretrained, vectors, coefficient=coefficient)


def weight_average(pretrained: StateDict, vectors: Sequence[StateDict]):
    """Weight averaging: Task Arithmetic with lam = 1/n, i.e. the mean of the n fine-tuned models."""
    return _merge_in_memory("weight_average", pretrained, vectors)


def ties_merge(pretrained: StateDict, vectors: Sequence[StateDict], k: float = 20.0,
               coefficient: float = 0.3, disjoint: str = "sum", trim: str = "threshold"):
    """TIES: trim, elect sign, disjoint merge; theta_pre + lam * merged.

    Trim, per task over the whole flattened model (P float entries, keys sorted, row-major):
    ``"threshold"`` (the TIES paper's code and FusionBench) keeps every entry with |tau_t| >= the
    K-th largest |tau_t|, K = int(P * k/100) + 1 (capped at P), so ties at the threshold are all kept;
    ``"exact_k"`` keeps exactly round(k/100 * P) entries, ties at the threshold by lowest flat index
    (on fp16 / bf16 models, with many equal |tau|, that favours the first keys); see
    ``engine.ties_rank``. Elect: gamma = sign(sum_t trimmed_t); where gamma == 0 it takes the
    majority sign sign(sum over the model of gamma), as the TIES reference code does. Disjoint: keep
    entries with sign == gamma; ``"sum"`` adds them (vision ports, backdoor papers, lam 0.3),
    ``"mean"`` divides by their count, 0 where none (original paper, lam ~ 1).
    """
    return _merge_in_memory("ties", pretrained, vectors, k=k, coefficient=coefficient, disjoint=disjoint, trim=trim)


def dare(pretrained: StateDict, vectors: Sequence[StateDict], p: float = 0.5, seed: int = 0,
         base: str = "task_arithmetic", coefficient: float = 0.3, **base_hyperparameters):
    """DARE: drop each tau_t entry with probability p, rescale survivors by 1/(1-p), then ``base``.

    ``base`` is "task_arithmetic" or "ties" (extra hyperparameters such as k, disjoint, trim go to it).
    Randomness is a counter-based hash of (seed, task index, key, flat index): reproducible, and
    independent of key order and of how tensors are chunked.
    """
    return _merge_in_memory("dare", pretrained, vectors, p=p, seed=seed, base=base,
                            coefficient=coefficient, **base_hyperparameters)


def breadcrumbs(pretrained: StateDict, vectors: Sequence[StateDict], top: float = 0.01,
                bottom: float = 0.85, coefficient: float = 0.3):
    """Model Breadcrumbs: per tensor and task keep the middle band of |tau_t|, then Task Arithmetic.

    Ranking each tensor's entries by (|tau|, flat index) ascending, the lowest round(bottom * N)
    (noise) and the highest round(top * N) (outliers) are zeroed. In the paper's percentile form
    beta = bottom and gamma = 1 - top.
    """
    return _merge_in_memory("breadcrumbs", pretrained, vectors, top=top, bottom=bottom, coefficient=coefficient)


def consensus(pretrained: StateDict, vectors: Sequence[StateDict], k: int = 2, lam: float = 0.4,
              coefficient: float = 0.3):
    """Consensus merging with TALL masks, on Task Arithmetic.

    tau_MTL = sum_t tau_t; mask_t = |tau_t| > lam_t * |tau_MTL - tau_t| (lam a float or one per task);
    keep entries set in >= k masks: theta_pre + coefficient * sum_t (consensus_mask * tau_t).
    """
    return _merge_in_memory("consensus", pretrained, vectors, k=k, lam=lam, coefficient=coefficient)


MERGE_METHODS: dict[str, Callable] = {
    "task_arithmetic": task_arithmetic,
    "weight_average": weight_average,
    "ties": ties_merge,
    "dare": dare,
    "breadcrumbs": breadcrumbs,
    "consensus": consensus,
}


def _canonical_name(name: str) -> str:
    canonical = str(name).strip().lower().replace("-", "_")
    if canonical not in MERGE_METHODS:
        raise MergeInputError(f"unknown merge method {name!r}; known: {', '.join(MERGE_METHODS)}")
    return canonical


def get_merge_method(name: str) -> Callable:
    """The method registered as ``name`` (case and '-'/'_' insensitive)."""
    return MERGE_METHODS[_canonical_name(name)]


def method_hyperparameters(name: str) -> dict:
    """Default hyperparameters of a method, read from its signature."""
    parameters = list(inspect.signature(get_merge_method(name)).parameters.values())[2:]
    return {p.name: p.default for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD}


# ---------------------------------------------------------------------------------------------
# plans
# ---------------------------------------------------------------------------------------------
def _number(method: str, name: str, value, low: float | None = None, high: float | None = None,
            high_open: bool = False, low_open: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MergeInputError(f"{method}: {name}={value!r} must be a number") from None
    if not math.isfinite(number) or (low is not None and (number <= low if low_open else number < low)) or (
            high is not None and (number >= high if high_open else number > high)):
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise MergeInputError(f"{method}: {name}={value!r} must lie in {left}{low}, {high}{right}")
    return number


def _per_task(method: str, name: str, value, n_tasks: int, low: float | None = None):
    """A float, or a sequence of one float per task -> float or tuple."""
    if isinstance(value, (list, tuple)) or (isinstance(value, torch.Tensor) and value.dim() == 1):
        values = [_number(method, name, v, low) for v in value]
        if len(values) != n_tasks:
            raise MergeInputError(f"{method}: {name} has {len(values)} values for {n_tasks} task vectors; "
                                  "give one per task or a single number")
        return tuple(values)
    return _number(method, name, value, low)


def _plan_task_arithmetic(n_tasks, *, coefficient):
    return MergePlan("task_arithmetic", "sum", _per_task("task_arithmetic", "coefficient", coefficient, n_tasks))


def _plan_weight_average(n_tasks):
    return MergePlan("weight_average", "sum", 1.0 / n_tasks)


def _plan_ties(n_tasks, *, k, coefficient, disjoint, trim):
    if disjoint not in ("sum", "mean"):
        raise MergeInputError(f"ties: disjoint={disjoint!r} must be 'sum' or 'mean'")
    return MergePlan("ties", "ties", _number("ties", "coefficient", coefficient),
                     ties_k=_number("ties", "k", k, 0, 100, low_open=True), ties_disjoint=disjoint,
                     ties_trim=check_ties_trim(trim))


def _plan_dare(n_tasks, *, p, seed, base, coefficient, **base_hyperparameters):
    base_name = _canonical_name(base)
    if base_name not in ("task_arithmetic", "ties"):
        raise MergeInputError(f"dare: base={base!r} must be 'task_arithmetic' or 'ties'")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MergeInputError(f"dare: seed={seed!r} must be an integer")
    base_plan = build_plan(base_name, n_tasks, coefficient=coefficient, **base_hyperparameters)
    return dataclasses.replace(base_plan, method=f"dare_{base_name}",
                               dare_p=_number("dare", "p", p, 0, 1, high_open=True), dare_seed=seed)


def _plan_breadcrumbs(n_tasks, *, top, bottom, coefficient):
    top = _number("breadcrumbs", "top", top, 0, 1)
    bottom = _number("breadcrumbs", "bottom", bottom, 0, 1)
    if top + bottom > 1:
        raise MergeInputError(f"breadcrumbs: top + bottom = {top + bottom} drops everything; keep it <= 1")
    return MergePlan("breadcrumbs", "sum", _number("breadcrumbs", "coefficient", coefficient),
                     breadcrumbs_top=top, breadcrumbs_bottom=bottom)


def _plan_consensus(n_tasks, *, k, lam, coefficient):
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise MergeInputError(f"consensus: k={k!r} must be a positive integer (masks an entry must be in)")
    lam = _per_task("consensus", "lam", lam, n_tasks, low=0)
    lam = lam if isinstance(lam, tuple) else (lam,) * n_tasks
    return MergePlan("consensus", "consensus", _number("consensus", "coefficient", coefficient),
                     consensus_k=k, consensus_lam=lam)


_PLAN_BUILDERS = {
    "task_arithmetic": _plan_task_arithmetic,
    "weight_average": _plan_weight_average,
    "ties": _plan_ties,
    "dare": _plan_dare,
    "breadcrumbs": _plan_breadcrumbs,
    "consensus": _plan_consensus,
}


def build_plan(method: str, n_tasks: int, **hyperparameters) -> MergePlan:
    """Validated MergePlan for ``method`` with the method's defaults filled in."""
    name = _canonical_name(method)
    if n_tasks < 1:
        raise MergeInputError(f"{name}: no task vectors given; pass at least one fine-tuned model")
    signature = inspect.signature(MERGE_METHODS[name])
    try:
        bound = signature.bind(None, None, **hyperparameters)
    except TypeError as error:
        known = ", ".join(method_hyperparameters(name)) or "none"
        raise MergeInputError(f"{name}: {error}; its hyperparameters are: {known}") from None
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    arguments.pop("pretrained")
    arguments.pop("vectors")
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(parameter.name, {}))
    try:
        return _PLAN_BUILDERS[name](n_tasks, **arguments)
    except TypeError as error:
        raise MergeInputError(f"{name}: {error}") from None


# ---------------------------------------------------------------------------------------------
# in-memory evaluation
# ---------------------------------------------------------------------------------------------
def validate_vectors(pretrained: StateDict, vectors: Sequence[StateDict]) -> None:
    """Same keys in every vector, each a float key of ``pretrained`` with its shape, finite values."""
    if not isinstance(vectors, (list, tuple)) or not vectors:
        raise MergeInputError("need a non-empty list of task vectors (dicts of tensors)")
    reference = set(vectors[0])
    for index, vector in enumerate(vectors):
        if set(vector) != reference:
            missing = sorted(reference - set(vector))
            if missing:
                raise MergeInputError(f"task vector {index} lacks key {missing[0]!r} present in task vector 0; "
                                      "build all vectors from the same architecture")
            extra = sorted(set(vector) - reference)
            raise MergeInputError(f"task vector {index} has key {extra[0]!r} absent from task vector 0; "
                                  "build all vectors from the same architecture")
    for key in sorted(reference):
        if key not in pretrained:
            raise MergeInputError(f"task vector key {key!r} is not in the pre-trained state dict; wrong base model?")
        base = pretrained[key]
        if not is_mergeable(base):
            raise MergeInputError(f"key {key!r} is {base.dtype} in the pre-trained state dict; only float tensors "
                                  "are merged (build vectors with task_vector)")
        for index, vector in enumerate(vectors):
            tensor = vector[key]
            if tuple(tensor.shape) != tuple(base.shape):
                raise MergeInputError(f"task vector {index}, key {key!r}: shape {tuple(tensor.shape)} != "
                                      f"pre-trained shape {tuple(base.shape)}; wrong architecture")
            if not is_mergeable(tensor):
                raise MergeInputError(f"task vector {index}, key {key!r}: dtype {tensor.dtype} is not floating point")
            if not bool(torch.isfinite(tensor).all()):
                raise MergeInputError(f"task vector {index}, key {key!r}: contains NaN or inf; "
                                      "the fine-tuned model diverged")


class _DictSource:
    """TensorSource over in-memory dicts (whole tensors; reads are flat views moved to CPU)."""

    def __init__(self, pretrained: StateDict, vectors: Sequence[StateDict]):
        self.pretrained = pretrained
        self.vectors = vectors
        self.n_tasks = len(vectors)
        self._merge_keys = sorted(vectors[0])

    def keys(self):
        return list(self.pretrained)

    def merge_keys(self):
        return self._merge_keys

    def shape(self, key):
        return tuple(self.pretrained[key].shape)

    def dtype(self, key):
        return self.pretrained[key].dtype

    def numel(self, key):
        return self.pretrained[key].numel()

    def compute_dtype(self, key):
        return compute_dtype(self.pretrained[key].dtype, *(v[key].dtype for v in self.vectors))

    def read_pretrained(self, key, start, stop):
        return self.pretrained[key].detach().cpu().reshape(-1)[start:stop]

    def read_task_vector(self, task, key, start, stop, pre):
        tensor = self.vectors[task][key].detach().cpu().reshape(-1)[start:stop]
        return tensor.to(self.compute_dtype(key))

    def read_whole(self, key):
        return self.pretrained[key].detach().cpu()

    def finish_sweep(self):
        pass


def _merge_in_memory(method: str, pretrained: StateDict, vectors: Sequence[StateDict], **hyperparameters):
    validate_vectors(pretrained, vectors)
    plan = build_plan(method, len(vectors), **hyperparameters)
    return run_plan(_DictSource(pretrained, vectors), plan, exact_thresholds)
