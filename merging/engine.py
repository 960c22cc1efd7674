"""Chunked merge engine shared by the in-memory methods (``methods``) and the file engine (``streaming``).

A merge is described by a ``MergePlan`` and evaluated key by key, and within a key chunk by chunk of
the row-major flattened tensor. Every per-element rule is chunk-independent (sums run task by task,
DARE randomness is a counter-based hash of the element index, ranks use (value, index) order), so a
chunked streaming merge gives the same bits as a whole-tensor in-memory one. The only whole-model
quantity is TIES' per-task magnitude threshold; ``exact_thresholds`` gets it by sorting in memory,
``radix_thresholds`` by streaming histograms of the float bit patterns, and both yield the same
``TiesThreshold`` (the rank comes from ``ties_rank``, the one home of the trim rule).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Protocol, Sequence

import torch

from .io import MergeInputError

try:  # progress bars are a convenience; the engine works without tqdm
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


# ---------------------------------------------------------------------------------------------
# plan
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MergePlan:
    """What to compute: per-task sparsification, then one combine rule, then theta_pre + delta.

    combine: "sum" (delta = lam * sum_t tau_t, or sum_t lam_t tau_t), "ties", or "consensus".
    """

    method: str
    combine: str
    coefficient: float | tuple[float, ...]
    dare_p: float | None = None
    dare_seed: int = 0
    breadcrumbs_top: float | None = None
    breadcrumbs_bottom: float | None = None
    ties_k: float | None = None
    ties_disjoint: str = "sum"
    ties_trim: str = "threshold"
    consensus_k: int = 2
    consensus_lam: tuple[float, ...] = field(default_factory=tuple)


class TensorSource(Protocol):
    """Where pre-trained tensors and task vectors come from (dicts in memory, or files)."""

    n_tasks: int

    def keys(self) -> list[str]: ...            # every output key, in output order
    def merge_keys(self) -> list[str]: ...      # float keys to merge, sorted (the global flat order)
    def shape(self, key: str) -> tuple[int, ...]: ...
    def dtype(self, key: str) -> torch.dtype: ...
    def numel(self, key: str) -> int: ...
    def compute_dtype(self, key: str) -> torch.dtype: ...
    def read_pretrained(self, key: str, start: int, stop: int) -> torch.Tensor: ...
    def read_task_vector(self, task: int, key: str, start: int, stop: int, pre: torch.Tensor) -> torch.Tensor: ...
    def read_whole(self, key: str) -> torch.Tensor: ...
    def finish_sweep(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# small exact helpers
# ---------------------------------------------------------------------------------------------
def round_count(total: int, fraction: float | Fraction) -> int:
    """round(fraction * total) with halves rounded up, in exact rational arithmetic; clamped to [0, total]."""
    value = math.floor(Fraction(total) * Fraction(fraction) + Fraction(1, 2))
    return min(max(value, 0), total)


def chunk_bounds(numel: int, chunk_elements: int | None) -> list[tuple[int, int]]:
    """[start, stop) ranges covering 0..numel; one range when chunk_elements is None."""
    if numel == 0:
        return []
    step = numel if not chunk_elements else max(int(chunk_elements), 1)
    return [(start, min(start + step, numel)) for start in range(0, numel, step)]


def _progress(iterable, enabled: bool, desc: str, total: int | None = None):
    if not enabled or tqdm is None:
        return iterable
    return tqdm(iterable, desc=desc, total=total, unit="tensor", leave=False)


def _sequential_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """sum_t w_t x_t accumulated task by task (fixed order per element, hence chunk-independent)."""
    if weights is None:
        total = tensors[0].clone()
        for tensor in tensors[1:]:
            total.add_(tensor)
    else:
        total = tensors[0] * weights[0]
        for tensor, weight in zip(tensors[1:], weights[1:]):
            total.add_(tensor, alpha=weight)
    return total


# ---------------------------------------------------------------------------------------------
# DARE randomness: counter-based SplitMix64, so a slice of the mask equals the mask of the slice
# ---------------------------------------------------------------------------------------------
def _signed64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed64(0x9E3779B97F4A7C15)
_MIX1 = _signed64(0xBF58476D1CE4E5B9)
_MIX2 = _signed64(0x94D049BB133111EB)


def _logical_shift_right(values: torch.Tensor, bits: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic; masking the sign-extended bits makes it logical.
    return (values >> bits) & ((1 << (64 - bits)) - 1)


def dare_stream_id(seed: int, task: int, key: str) -> int:
    """Stable 64-bit stream id of (seed, task index, key); independent of key order and process."""
    digest = hashlib.blake2b(f"dare\0{seed}\0{task}\0{key}".encode(), digest_size=8).digest()
    return _signed64(int.from_bytes(digest, "little"))


def dare_keep_mask(seed: int, task: int, key: str, start: int, stop: int, p: float) -> torch.Tensor:
    """Keep mask (bool [stop-start]) of DARE for flat elements [start, stop) of ``key`` in task ``task``.

    u_j = top 53 bits of SplitMix64(stream + (j+1)*golden) / 2**53, uniform on [0, 1); keep iff u_j >= p,
    so each entry is dropped with probability p. Compared as integers, hence exact for any p.
    """
    index = torch.arange(start + 1, stop + 1, dtype=torch.int64)
    z = index * _GOLDEN + dare_stream_id(seed, task, key)
    z = (z ^ _logical_shift_right(z, 30)) * _MIX1
    z = (z ^ _logical_shift_right(z, 27)) * _MIX2
    z = z ^ _logical_shift_right(z, 31)
    threshold = math.ceil(Fraction(p) * (1 << 53))
    return _logical_shift_right(z, 11) >= threshold


def dare_apply(tau: torch.Tensor, seed: int, task: int, key: str, start: int, p: float) -> torch.Tensor:
    """Drop entries with probability p, rescale survivors by 1/(1-p) (expectation preserved)."""
    if p == 0:
        return tau
    keep = dare_keep_mask(seed, task, key, start, start + tau.numel(), p)
    return torch.where(keep, tau / (1.0 - p), torch.zeros((), dtype=tau.dtype))


# ---------------------------------------------------------------------------------------------
# Breadcrumbs: per-tensor middle band of |tau| by rank in (|tau|, index) order
# ---------------------------------------------------------------------------------------------
def breadcrumbs_band(tau_flat: torch.Tensor, top: float, bottom: float):
    """Band ((lo_value, lo_index), (hi_value, hi_index)) of the ranks kept, or None if empty.

    Ranks r = position in ascending (|tau|, flat index) order; kept ranks are
    [round(bottom*N), N - round(top*N)). Returning the boundary elements lets chunks test membership.
    """
    numel = tau_flat.numel()
    n_bottom, n_top = round_count(numel, bottom), round_count(numel, top)
    if n_bottom + n_top >= numel:
        return None
    values, order = torch.sort(tau_flat.abs(), stable=True)
    lo, hi = n_bottom, numel - n_top - 1
    return (values[lo].item(), int(order[lo])), (values[hi].item(), int(order[hi]))


def breadcrumbs_apply(tau: torch.Tensor, band, start: int) -> torch.Tensor:
    """Zero entries of a chunk (flat elements [start, start+len)) outside the band."""
    if band is None:
        return torch.zeros_like(tau)
    (lo_value, lo_index), (hi_value, hi_index) = band
    magnitude = tau.abs()
    index = torch.arange(start, start + tau.numel(), dtype=torch.int64)
    above_lo = (magnitude > lo_value) | ((magnitude == lo_value) & (index >= lo_index))
    below_hi = (magnitude < hi_value) | ((magnitude == hi_value) & (index <= hi_index))
    return torch.where(above_lo & below_hi, tau, torch.zeros((), dtype=tau.dtype))


# ---------------------------------------------------------------------------------------------
# TIES pieces
# ---------------------------------------------------------------------------------------------
#: "threshold": the reference implementations' rule (default); "exact_k": exactly round(k% * P) entries
TIES_TRIM_RULES = ("threshold", "exact_k")


def check_ties_trim(trim) -> str:
    """``trim`` if it names a rule of ``TIES_TRIM_RULES``, else MergeInputError naming both."""
    if not isinstance(trim, str) or trim not in TIES_TRIM_RULES:
        raise MergeInputError(f"ties: trim={trim!r} must be 'threshold' (the reference TIES rule: every |tau| >= "
                              "the threshold, ties kept) or 'exact_k' (exactly round(k% * P) entries)")
    return trim


def ties_rank(total: int, k: float, trim: str) -> int:
    """Rank K (1 = largest) of the |tau| that is the trim threshold, per task over P = ``total`` entries; 0 keeps none.

    threshold: K = min(int(P * (k / 100)) + 1, P), and every |tau| >= the K-th largest is kept (ties
    included). This is the TIES paper's code and FusionBench (``topk_values_mask``: kthvalue of the
    (P - int(P * K))-th smallest, mask |tau| >= it), including their float product P * (k / 100), so the
    count agrees with theirs to the entry. exact_k: K = round(k% * P) (halves up, exact rational), and
    exactly K entries are kept, ties at the threshold by lowest global flat index.
    """
    if check_ties_trim(trim) == "threshold":
        return min(int(total * (float(k) / 100)) + 1, total)
    return round_count(total, Fraction(k) / 100)


@dataclass
class TiesThreshold:
    """Keep |tau| > value, plus the first ``ties_to_keep`` entries with |tau| == value in global flat order
    (``ties_to_keep`` None: every entry with |tau| == value, the threshold rule)."""

    value: float
    ties_to_keep: int | None


def _ties_threshold(value: float, ties_within_rank: int, trim: str) -> TiesThreshold:
    """The threshold at the K-th largest |tau| = ``value``; ``ties_within_rank`` = K - #(|tau| > value)."""
    return TiesThreshold(value, None if trim == "threshold" else ties_within_rank)


def ties_trim(tau: torch.Tensor, threshold: TiesThreshold, selection_dtype: torch.dtype) -> torch.Tensor:
    """Trimmed chunk; exact_k consumes ``threshold.ties_to_keep`` (so chunks must come in global flat order)."""
    magnitude = tau.abs()
    if magnitude.dtype != selection_dtype:
        magnitude = magnitude.to(selection_dtype)
    if threshold.ties_to_keep is None:
        return torch.where(magnitude >= threshold.value, tau, torch.zeros((), dtype=tau.dtype))
    keep = magnitude > threshold.value
    if threshold.ties_to_keep > 0:
        equal = magnitude == threshold.value
        n_equal = int(equal.sum())
        if n_equal:
            if n_equal > threshold.ties_to_keep:
                # deterministic tie-break: lowest flat index first
                equal &= equal.cumsum(0) <= threshold.ties_to_keep
                n_equal = threshold.ties_to_keep
            keep |= equal
            threshold.ties_to_keep -= n_equal
    return torch.where(keep, tau, torch.zeros((), dtype=tau.dtype))


@dataclass
class TiesFixup:
    """Entries whose trimmed sum is exactly 0 while some trimmed value is not (exact cancellation).

    Their elected sign is the model-wide majority sign, known only after every key is seen, so both
    outcomes are kept and the right one is written at the end.
    """

    key: str
    index: torch.Tensor
    pretrained: torch.Tensor
    if_positive: torch.Tensor
    if_negative: torch.Tensor


def ties_disjoint(trimmed: Sequence[torch.Tensor], disjoint: str):
    """Disjoint merge of trimmed chunks [c] x n -> (aggregate [c], sign balance, fixup (index, pos, neg) or None).

    gamma = sign(sum_t trimmed_t); agree_t = trimmed_t * gamma > 0; sum: sum_t agree_t * trimmed_t;
    mean: that / max(#agree, 1). Entries with gamma == 0 get 0 here (see TiesFixup).
    """
    elected = torch.sign(_sequential_sum(trimmed))
    balance = int((elected > 0).sum()) - int((elected < 0).sum())
    # Agreeing entries all have sign gamma, so sum_t |v_t| [agree] * gamma == sum_t v_t [agree] exactly
    # (rounding is sign-symmetric); accumulating clamp(v * gamma, min=0) saves a where() per task.
    magnitude_sum = torch.zeros_like(elected)
    count = torch.zeros_like(elected) if disjoint == "mean" else None
    largest = None  # max_t v_t: an exact cancellation (sum 0, some v != 0) needs a positive v
    for values in trimmed:
        agreeing = values * elected
        if count is not None:
            count.add_(agreeing > 0)
        magnitude_sum.add_(agreeing.clamp_(min=0))
        largest = values.clone() if largest is None else torch.maximum(largest, values, out=largest)
    if count is not None:
        magnitude_sum.div_(count.clamp_(min=1))
    aggregate = magnitude_sum.mul_(elected)
    cancelled = (elected == 0) & (largest > 0)
    fixup = None
    if bool(cancelled.any()):
        index = cancelled.nonzero().squeeze(1)
        picked = [values[index] for values in trimmed]
        zero = torch.zeros((), dtype=elected.dtype)
        outcomes = []
        for sign in (1, -1):
            kept = [torch.where(v * sign > 0, v, zero) for v in picked]
            total = _sequential_sum(kept)
            if disjoint == "mean":
                total = total / _sequential_sum([(v * sign > 0).to(total.dtype) for v in picked]).clamp(min=1)
            outcomes.append(total)
        fixup = (index, outcomes[0], outcomes[1])
    return aggregate, balance, fixup


# ---------------------------------------------------------------------------------------------
# thresholds
# ---------------------------------------------------------------------------------------------
def _selection_dtype(source: TensorSource) -> torch.dtype:
    """|tau| of all keys is compared in one dtype: float64 if any key computes in float64."""
    keys = source.merge_keys()
    return torch.float64 if any(source.compute_dtype(k) == torch.float64 for k in keys) else torch.float32


def _per_task_vector(source: TensorSource, plan: MergePlan, task: int, key: str, start: int, stop: int,
                     pre: torch.Tensor, bands=None) -> torch.Tensor:
    """tau_t on [start, stop) after the plan's per-task sparsification (DARE / Breadcrumbs)."""
    tau = source.read_task_vector(task, key, start, stop, pre)
    if plan.dare_p is not None:
        tau = dare_apply(tau, plan.dare_seed, task, key, start, plan.dare_p)
    if plan.breadcrumbs_top is not None:
        tau = breadcrumbs_apply(tau, bands[task], start)
    return tau


def exact_thresholds(source: TensorSource, plan: MergePlan, chunk_elements, progress) -> list[TiesThreshold]:
    """Per task, the exact K-th largest |tau| (K = ``ties_rank``) by a whole-model kthvalue. O(P) memory."""
    selection = _selection_dtype(source)
    keys = source.merge_keys()
    total = sum(source.numel(k) for k in keys)
    keep = ties_rank(total, plan.ties_k, plan.ties_trim)
    if keep == 0:
        return [TiesThreshold(math.inf, 0) for _ in range(source.n_tasks)]
    thresholds = []
    for task in range(source.n_tasks):
        parts = []
        for key in keys:
            pre = source.read_pretrained(key, 0, source.numel(key))
            parts.append(_per_task_vector(source, plan, task, key, 0, source.numel(key), pre).abs().to(selection))
        magnitudes = torch.cat(parts)
        del parts
        value = torch.kthvalue(magnitudes, total - keep + 1).values
        above = int((magnitudes > value).sum())
        thresholds.append(_ties_threshold(value.item(), keep - above, plan.ties_trim))
    source.finish_sweep()
    return thresholds


def radix_thresholds(source: TensorSource, plan: MergePlan, chunk_elements, progress) -> list[TiesThreshold]:
    """Same result as ``exact_thresholds`` in O(n * 65536) memory, by radix selection over streamed chunks.

    For |tau| >= 0 the IEEE bit pattern (as int32 / int64) orders like the value. Each sweep over the
    model histograms the next 16 (or fewer) bits of the entries still matching the prefix found so
    far, for all tasks at once; walking a histogram from the top fixes the next digit of the K-th
    largest pattern. float32 needs 2 sweeps (31 bits), float64 4 (63 bits). What remains of K after
    the last digit is the number of entries equal to the threshold within rank K (kept by exact_k;
    the threshold rule keeps every tie).
    """
    selection = _selection_dtype(source)
    bits_dtype, total_bits, widths = (
        (torch.int32, 31, (16, 15)) if selection == torch.float32 else (torch.int64, 63, (16, 16, 16, 15))
    )
    keys = source.merge_keys()
    total = sum(source.numel(k) for k in keys)
    keep = ties_rank(total, plan.ties_k, plan.ties_trim)
    n_tasks = source.n_tasks
    if keep == 0:
        return [TiesThreshold(math.inf, 0) for _ in range(n_tasks)]
    prefix = [0] * n_tasks
    remaining = [keep] * n_tasks
    fixed_bits = 0
    for sweep, width in enumerate(widths):
        shift = total_bits - fixed_bits - width
        digit_mask = (1 << width) - 1
        histograms = [torch.zeros(1 << width, dtype=torch.int64) for _ in range(n_tasks)]
        for key in _progress(keys, progress, f"TIES threshold sweep {sweep + 1}/{len(widths)}"):
            bands = _bands_for_key(source, plan, key)
            for start, stop in chunk_bounds(source.numel(key), chunk_elements):
                pre = source.read_pretrained(key, start, stop)
                for task in range(n_tasks):
                    tau = _per_task_vector(source, plan, task, key, start, stop, pre, bands)
                    bits = tau.abs().to(selection).view(bits_dtype)
                    del tau
                    if fixed_bits:
                        bits = bits[(bits >> (shift + width)) == prefix[task]]
                        digits = (bits >> shift) & digit_mask
                    else:  # bits < 2**total_bits, so the top digit needs no mask
                        digits = bits >> shift
                    if digits.numel() >= (1 << width) // 8:
                        histograms[task] += torch.bincount(digits, minlength=1 << width)
                    elif digits.numel():  # small chunk: O(chunk) scatter beats an O(65536) bincount
                        histograms[task].index_add_(0, digits.long(), torch.ones_like(digits, dtype=torch.int64))
        source.finish_sweep()
        for task in range(n_tasks):
            # counts of entries with digit >= d, for d from the top digit down
            at_least = histograms[task].flip(0).cumsum(0)
            position = int(torch.searchsorted(at_least, torch.tensor([remaining[task]]))[0])
            digit = digit_mask - position
            remaining[task] -= int(at_least[position - 1]) if position > 0 else 0
            prefix[task] = (prefix[task] << width) | digit
        fixed_bits += width
    return [
        _ties_threshold(torch.tensor(prefix[t], dtype=bits_dtype).view(selection).item(), remaining[t], plan.ties_trim)
        for t in range(n_tasks)
    ]


def _bands_for_key(source: TensorSource, plan: MergePlan, key: str):
    """Breadcrumbs bands of ``key`` for every task (whole tensor, one task at a time), else None."""
    if plan.breadcrumbs_top is None:
        return None
    numel = source.numel(key)
    pre = source.read_pretrained(key, 0, numel)
    bands = []
    for task in range(source.n_tasks):
        tau = source.read_task_vector(task, key, 0, numel, pre)
        if plan.dare_p is not None:
            tau = dare_apply(tau, plan.dare_seed, task, key, 0, plan.dare_p)
        bands.append(breadcrumbs_band(tau, plan.breadcrumbs_top, plan.breadcrumbs_bottom))
    return bands


# ---------------------------------------------------------------------------------------------
# the merge pass
# ---------------------------------------------------------------------------------------------
ThresholdFn = Callable[[TensorSource, MergePlan, "int | None", bool], list]


def run_plan(source: TensorSource, plan: MergePlan, threshold_fn: ThresholdFn, *,
             chunk_elements: int | None = None, progress: bool = False) -> dict[str, torch.Tensor]:
    """theta_merged = theta_pre + delta(plan) for merge keys; other keys copied. Result in source key order."""
    n_tasks = source.n_tasks
    merge_keys = source.merge_keys()
    thresholds = None
    selection = None
    if plan.combine == "ties":
        thresholds = threshold_fn(source, plan, chunk_elements, progress)
        selection = _selection_dtype(source)
    per_task_coefficients = isinstance(plan.coefficient, tuple)
    merged: dict[str, torch.Tensor] = {}
    fixups: list[TiesFixup] = []
    sign_balance = 0
    for key in _progress(merge_keys, progress, f"merge ({plan.method})"):
        dtype, work = source.dtype(key), source.compute_dtype(key)
        out = torch.empty(source.numel(key), dtype=dtype)
        bands = _bands_for_key(source, plan, key)
        for start, stop in chunk_bounds(source.numel(key), chunk_elements):
            pre = source.read_pretrained(key, start, stop)
            taus = [_per_task_vector(source, plan, t, key, start, stop, pre, bands) for t in range(n_tasks)]
            if plan.combine == "sum":
                if per_task_coefficients:
                    delta = _sequential_sum(taus, plan.coefficient)
                else:
                    delta = _sequential_sum(taus).mul_(plan.coefficient)
            elif plan.combine == "ties":
                trimmed = [ties_trim(tau, thresholds[t], selection) for t, tau in enumerate(taus)]
                taus = None  # free the untrimmed chunks before aggregating
                aggregate, balance, fixup = ties_disjoint(trimmed, plan.ties_disjoint)
                del trimmed
                sign_balance += balance
                delta = aggregate.mul_(plan.coefficient)
                if fixup is not None:
                    index, if_positive, if_negative = fixup
                    fixups.append(TiesFixup(key, index + start, pre[index].clone(), if_positive, if_negative))
            elif plan.combine == "consensus":
                mtl = _sequential_sum(taus)
                votes = torch.zeros(mtl.shape, dtype=torch.int32)
                for lam, tau in zip(plan.consensus_lam, taus):
                    votes += tau.abs() > lam * (mtl - tau).abs()
                delta = torch.where(votes >= plan.consensus_k, mtl, torch.zeros((), dtype=mtl.dtype))
                delta.mul_(plan.coefficient)
            else:  # pragma: no cover - plans are built by methods.build_plan
                raise MergeInputError(f"unknown combine rule {plan.combine!r}")
            # not in place: ``pre`` may be a view of the caller's tensor
            out[start:stop] = (pre.to(work) + delta).to(dtype)
            taus = delta = None
        merged[key] = out.view(source.shape(key))
    source.finish_sweep()
    if fixups:
        majority = (sign_balance > 0) - (sign_balance < 0)
        if majority != 0:
            for fix in fixups:
                flat = merged[fix.key].view(-1)
                work = source.compute_dtype(fix.key)
                chosen = fix.if_positive if majority > 0 else fix.if_negative
                flat[fix.index] = (fix.pretrained.to(work) + plan.coefficient * chosen).to(flat.dtype)
    result = {}
    for key in source.keys():
        result[key] = merged[key] if key in merged else source.read_whole(key).clone()
    return result
