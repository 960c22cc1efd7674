"""Memory-lean merging straight from safetensors files.

``merge_files`` evaluates the same plans as ``methods`` but reads tensors (in chunks of at most
``chunk_elements`` elements) one key at a time, so peak memory is one merged model plus a few chunks
per input model, whatever the number of models. TIES' whole-model top-k threshold stays exact: it
is found by radix selection over streamed histograms (``engine.radix_thresholds``), then a final
sweep merges.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .engine import radix_thresholds, run_plan
from .io import MergeInputError, SafetensorsReader
from .methods import build_plan
from .task_vectors import compute_dtype

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "MAX_WEIGHT_SCALE", "first_non_finite", "merge_files", "validate_inputs"]

# 1M elements (4 MB in float32) per tensor read: small against a model, large enough that per-chunk
# Python overhead stays negligible.
DEFAULT_CHUNK_ELEMENTS = 1 << 20

#: a model weight may be at most this many times the largest |θ_pre| weight (see ``validate_inputs``)
MAX_WEIGHT_SCALE = 1e4


class _StateDictView:
    """Reader-like view of an in-memory state dict (θ_pre held by the caller): keys, shapes, flat reads."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], name: str):
        self.path = name
        self._state = state_dict
        for key, value in state_dict.items():
            if not isinstance(value, torch.Tensor):
                raise MergeInputError(f"{name}: value of key {key!r} is {type(value).__name__}, not a tensor")

    def keys(self) -> list[str]:
        return sorted(self._state)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._state[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._state[key].dtype

    def numel(self, key: str) -> int:
        return self._state[key].numel()

    def read_flat(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self._state[key].detach().cpu().reshape(-1)[start:stop]


def _check_paths(pretrained_path, model_paths) -> tuple[Path | None, list[Path]]:
    """Every path is a file and appears once (not even as θ_pre); ``pretrained_path`` None: θ_pre is in memory."""
    if isinstance(model_paths, (str, os.PathLike)) or not model_paths:
        raise MergeInputError("model_paths must be a non-empty list of fine-tuned .safetensors files")
    pretrained = None if pretrained_path is None else Path(pretrained_path)
    models = [Path(p) for p in model_paths]
    for path in ([pretrained] if pretrained is not None else []) + models:
        if path.is_dir():
            raise MergeInputError(f"{path}: is a directory, not a weights file; pass the exported .safetensors in it")
        if not path.is_file():
            raise MergeInputError(f"{path}: file not found; check the path (weights must be .safetensors)")
    seen: dict[str, int] = {} if pretrained is None else {os.path.realpath(pretrained): -1}
    for index, path in enumerate(models):
        real = os.path.realpath(path)
        if real in seen:
            other = "the pre-trained model" if seen[real] < 0 else f"model #{seen[real]} ({models[seen[real]]})"
            raise MergeInputError(f"{path}: model #{index} is the same file as {other}; "
                                  "each fine-tuned model must appear once (check the task -> file mapping)")
        seen[real] = index
    return pretrained, models


def _all_finite(tensor: torch.Tensor) -> bool:
    if tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        tensor = tensor.float()  # float8 and other narrow floats: no sum / isfinite kernels of their own
    # A NaN or inf anywhere makes the sum non-finite, and a sum is far cheaper than isfinite();
    # only a non-finite sum (or a finite-valued overflow) needs the exact elementwise check.
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def first_non_finite(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The first key (in the dict's order) of a float tensor holding NaN or inf, or None when all are finite."""
    for key, tensor in state_dict.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not _all_finite(tensor.detach()):
            return key
    return None


def _abs_max(tensor: torch.Tensor) -> float:
    if not tensor.numel():
        return 0.0
    if tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        tensor = tensor.float()  # float8: no abs / max kernels of their own
    return float(tensor.abs().max())


def _check_magnitude(reader, key: str, tensor: torch.Tensor, bound: float, pre_max: float) -> None:
    largest = _abs_max(tensor)
    if largest > bound:
        raise MergeInputError(f"{reader.path}: key {key!r} holds a weight of magnitude {largest:.3g}, above the "
                              f"bound {bound:.3g} ({MAX_WEIGHT_SCALE:g} × max(largest |θ_pre| weight {pre_max:.3g}, 1)) "
                              "past which the forward pass overflows; the model diverged or is no fine-tune of this "
                              "base: re-train it or leave it out")


def _check_finite(reader, key: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() and not _all_finite(tensor):
        raise MergeInputError(f"{reader.path}: key {key!r} contains NaN or inf; the model diverged, "
                              "re-train it or leave it out")


def _check_structure(pre, models: Sequence[SafetensorsReader]) -> None:
    pre_keys = set(pre.keys())
    for model in models:
        keys = set(model.keys())
        missing, extra = sorted(pre_keys - keys), sorted(keys - pre_keys)
        if missing:
            raise MergeInputError(f"{model.path}: lacks key {missing[0]!r} of the pre-trained model {pre.path}; "
                                  "was it fine-tuned from this base?")
        if extra:
            raise MergeInputError(f"{model.path}: has key {extra[0]!r} absent from the pre-trained model "
                                  f"{pre.path}; export only the image encoder of the same architecture")
        for key in pre.keys():
            if model.shape(key) != pre.shape(key):
                raise MergeInputError(f"{model.path}: key {key!r} has shape {model.shape(key)}, pre-trained has "
                                      f"{pre.shape(key)}; wrong architecture")
            if model.dtype(key) != pre.dtype(key):
                raise MergeInputError(f"{model.path}: key {key!r} is {model.dtype(key)}, pre-trained is "
                                      f"{pre.dtype(key)}; export all models in one dtype")


def _open_checked(stack: contextlib.ExitStack, pretrained_path, model_paths):
    """Open θ_pre and the models as readers on ``stack`` after the path and structure checks."""
    pretrained, models = _check_paths(pretrained_path, model_paths)
    pre = stack.enter_context(SafetensorsReader(pretrained))
    readers = [stack.enter_context(SafetensorsReader(p)) for p in models]
    _check_structure(pre, readers)
    return pre, readers


def validate_inputs(pretrained, model_paths, *, check_finite: bool = True,
                    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, pretrained_name: str = "θ_pre") -> list[str]:
    """Check the merge inputs before any work; return the float keys that will be merged (sorted).

    ``pretrained`` is θ_pre: a safetensors path, or an in-memory state dict (the in-memory engine;
    ``pretrained_name`` names it in messages). Checks: files exist and are valid safetensors (never
    unpickled), no path repeats (nor equals the pre-trained one), every model has θ_pre's keys, shapes
    and dtypes, and (``check_finite``) all float values are finite and no model weight exceeds
    ``MAX_WEIGHT_SCALE`` × max(max |θ_pre|, 1). During the same pass the float tensors are hashed: two
    inputs with identical weights (a copy merged twice) are refused, and a model identical to θ_pre (a
    zero task vector) draws a warning. Raises MergeInputError naming the file and the key.

    The magnitude bound: a finite weight such as 3e38 passes the finite check yet overflows the first
    matmul of the forward pass (every row would be NaN, reported as chance accuracy). Fine-tuning cannot
    come near the bound: each AdamW step moves a weight by about lr (1e-5 here), so even 10^6 steps move
    it by ≤ 10, while the bound is ≥ 10^4 (10^4 × θ_pre's largest weight, and at least 10^4). Only a
    diverged run or weights of another model exceed it.
    """
    in_memory = isinstance(pretrained, Mapping)
    _, models = _check_paths(None if in_memory else pretrained, model_paths)
    with contextlib.ExitStack() as stack:
        if in_memory:
            pre = _StateDictView(pretrained, pretrained_name)
        else:
            pre = stack.enter_context(SafetensorsReader(pretrained))
        readers = [stack.enter_context(SafetensorsReader(p)) for p in models]
        _check_structure(pre, readers)
        merge_keys = [k for k in pre.keys() if pre.dtype(k).is_floating_point]
        digests, pre_max = [], 0.0
        for reader in [pre, *readers]:  # θ_pre first: its largest weight sets the models' bound
            bound = MAX_WEIGHT_SCALE * max(pre_max, 1.0)
            digest = hashlib.blake2b(digest_size=16)
            for key in merge_keys:  # one read per chunk serves the finiteness and magnitude checks and the digest
                digest.update(f"{key}|{reader.shape(key)}|{reader.dtype(key)}|".encode())
                for start in range(0, reader.numel(key), chunk_elements):
                    chunk = reader.read_flat(key, start, start + chunk_elements)
                    if check_finite:
                        _check_finite(reader, key, chunk)
                        if reader is pre:
                            pre_max = max(pre_max, _abs_max(chunk))
                        else:
                            _check_magnitude(reader, key, chunk, bound, pre_max)
                    digest.update(chunk.contiguous().view(torch.uint8).numpy())  # a buffer: no copy
            digests.append(digest.digest())
        _check_copies(pre, models, digests)
    return merge_keys


def _check_copies(pre, models: Sequence[Path], digests: list[bytes]) -> None:
    """Refuse two models with identical weights; warn about a model identical to θ_pre (``digests[0]``)."""
    first: dict[bytes, int] = {}
    for index, value in enumerate(digests[1:]):
        if value == digests[0]:
            warnings.warn(f"{models[index]}: weights identical to the pre-trained model {pre.path}; its task "
                          "vector is zero (was it trained?)", stacklevel=3)
        elif value in first:
            raise MergeInputError(f"{models[index]}: model #{index} has exactly the weights of model "
                                  f"#{first[value]} ({models[first[value]]}); each fine-tuned model must appear "
                                  "once (a copy would be merged twice)")
        first.setdefault(value, index)


class _FileSource:
    """TensorSource over safetensors files; checks finiteness during the first sweep over the data."""

    def __init__(self, pretrained: SafetensorsReader, models: Sequence[SafetensorsReader]):
        self.pretrained = pretrained
        self.models = list(models)
        self.n_tasks = len(self.models)
        self.check_finite = True
        self._keys = pretrained.keys()
        self._merge_keys = [k for k in self._keys if pretrained.dtype(k).is_floating_point]

    def keys(self):
        return self._keys

    def merge_keys(self):
        return self._merge_keys

    def shape(self, key):
        return self.pretrained.shape(key)

    def dtype(self, key):
        return self.pretrained.dtype(key)

    def numel(self, key):
        return self.pretrained.numel(key)

    def compute_dtype(self, key):
        return compute_dtype(self.pretrained.dtype(key))

    def read_pretrained(self, key, start, stop):
        chunk = self.pretrained.read_flat(key, start, stop)
        if self.check_finite:
            _check_finite(self.pretrained, key, chunk)
        return chunk

    def read_task_vector(self, task, key, start, stop, pre):
        model = self.models[task]
        chunk = model.read_flat(key, start, stop)
        if self.check_finite:
            _check_finite(model, key, chunk)
        work = self.compute_dtype(key)
        # the chunk is a fresh buffer, so subtracting in place saves one allocation per read
        return chunk.to(work).sub_(pre.to(work))

    def read_whole(self, key):
        return self.pretrained.get(key)

    def finish_sweep(self):
        self.check_finite = False


def merge_files(pretrained_path, model_paths: Sequence, method: str, *, progress: bool = True,
                chunk_elements: int | None = DEFAULT_CHUNK_ELEMENTS, num_threads: int | None = None,
                **hyperparameters) -> dict[str, torch.Tensor]:
    """Merge fine-tuned models stored as safetensors files; equals ``method`` on the loaded task vectors.

    tau_t = theta_t - theta_pre is formed chunk by chunk and never held whole. Memory: the merged
    model + O(n * chunk_elements) working space (+ n * 65536 histogram counts for TIES), versus
    O(n * P) for loading everything. Inputs are validated (``validate_inputs``) before any work;
    finiteness is checked while the first sweep reads the data rather than in an extra pass.
    ``progress`` shows a tqdm bar over keys. ``num_threads`` sets torch's intra-op threads for the
    merge (restored afterwards); 1 is fastest on small or shared machines, where every chunk-sized
    op of a multi-threaded pool can stall waiting for a descheduled thread.
    """
    if isinstance(model_paths, (str, os.PathLike)):
        raise MergeInputError("model_paths must be a non-empty list of fine-tuned .safetensors files")
    model_paths = list(model_paths)
    plan = build_plan(method, len(model_paths), **hyperparameters)
    previous_threads = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        pre, readers = _open_checked(stack, pretrained_path, model_paths)
        if num_threads is not None:
            torch.set_num_threads(int(num_threads))
            stack.callback(torch.set_num_threads, previous_threads)
        source = _FileSource(pre, readers)
        return run_plan(source, plan, radix_thresholds, chunk_elements=chunk_elements, progress=progress)
