"""Train: clean fine-tunes (and, as later modules land, attacks) through LightningCLI.

    python train.py fit --config configs/experiment/embedded_finetune.yaml --data.task shapes
    python train.py fit --config configs/experiment/vitb32_finetune.yaml --data.task eurosat \
        --data.data_dir /data/eurosat --trainer.devices 4
    python train.py fit --config ... --ckpt_path last        # resume from the newest last.ckpt of this run's logger

Every run saves its resolved config (config.yaml) in its log directory; the exported encoder lands
where the ExportEncoder callback says (default <log_dir>/encoder.safetensors).

Reliability (ERRORS.md lists every refused input):

- bad input (config, task, data, weights, checkpoint, hyperparameter, output location) stops the run
  before training with exit status 2 and one line ``train.py: error: ...`` naming the input and the
  fix; ``BADMERGING_TRACEBACK=1`` shows the traceback instead. ``main()`` raises the typed exception
  (a ``ValueError`` subclass such as ``TrainInputError``, ``DatasetError``, ``ModelLoadError``).
  A run that fails before its first training step removes the log directory it created.
- checkpoints are written atomically (temp name, fsync, rename) and read with ``weights_only=True``;
- the position inside the epoch is part of every checkpoint (one device, and under DDP), so a run
  killed mid-epoch and resumed with ``--ckpt_path`` sees the same batches in the same order and ends
  with the same weights as an uninterrupted run (bit for bit on CPU with ``--trainer.deterministic true``);
- under SLURM (``scripts/slurm/*.sbatch``) the requeue signal is acted on at a batch end all ranks
  agree on (``SLURMRequeue``); ``--ckpt_path last`` also finds Lightning's ``hpc_ckpt_*.ckpt``;
- a non-finite training loss stops training with a message naming the step (``FineTune.check_finite``).
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler

from datamodules.datamodule import TaskDataModule
from lightning_modules.finetune import FineTune  # the base class: BackdoorInjection etc. are chosen by class_path

CKPT_KEYWORDS = ("last", "best", "hpc")


class TrainInputError(ValueError):
    """An input of ``train.py`` that cannot be used; the one-line message names it and the fix."""


def _one_line(error: BaseException | str) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


# ---------------------------------------------------------------------------------------------
# Checkpoints: atomic writes
# ---------------------------------------------------------------------------------------------
class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO that writes to a temp file in the same directory, fsyncs, then renames.

    A crash (even SIGKILL) while a checkpoint is written leaves the previous ``last.ckpt`` intact
    instead of a truncated file that cannot be resumed from.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote filesystems: fsspec's own write
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


# ---------------------------------------------------------------------------------------------
# Data order that survives a resume
# ---------------------------------------------------------------------------------------------
class ResumableBatchSampler(BatchSampler):
    """A BatchSampler whose next iteration can resume a checkpointed position in the data order.

    The generator state is recorded when an iteration starts, right before the sampler draws its
    permutation (after the DataLoader drew its base seed). Resuming restores it and skips the batches
    already trained on (drawn as indices only, never loaded); resuming after a completed epoch replays
    that epoch's draws and the next iterator's base-seed draw, so the generator continues exactly as
    in an uninterrupted run.
    """

    def __init__(self, sampler, batch_size: int, drop_last: bool, generator: torch.Generator | None = None):
        super().__init__(sampler, batch_size, drop_last)
        self.generator = generator
        self.epoch_start_state: torch.Tensor | None = None
        self.pending: dict | None = None
        self.started = 0  # iterations that have begun drawing

    def _resume(self) -> int:
        state, self.pending = self.pending, None
        generator = self.generator
        if generator is not None and state.get("generator_state") is not None:
            generator.set_state(state["generator_state"])
        if state.get("replay_epoch"):
            for _ in super().__iter__():  # the finished epoch's permutation draws (and any trailing draw)
                pass
        if generator is not None and state.get("draw_base_seed"):
            torch.empty((), dtype=torch.int64).random_(generator=generator)  # as a fresh DataLoader iterator does
        return int(state.get("batches_done", 0))

    def __iter__(self):
        skip = self._resume() if self.pending is not None else 0
        self.epoch_start_state = self.generator.get_state() if self.generator is not None else None
        self.started += 1
        for index, batch in enumerate(super().__iter__()):
            if index >= skip:
                yield batch


class ResumableDataLoader(DataLoader):
    """DataLoader with ``state_dict``/``load_state_dict`` (Lightning stores it in every checkpoint).

    ``progress()`` returns how many batches of the current epoch training has consumed, or -1 once the
    epoch is complete (the trainer's count: the loader's own runs ahead by the prefetched batches).
    """

    def __init__(self, *args, progress: Callable[[], int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.progress = progress
        self.created = 0  # iterations requested (an iterator draws its first batch later)

    def __iter__(self):
        self.created += 1
        return super().__iter__()

    def state_dict(self) -> dict:
        sampler: ResumableBatchSampler = self.batch_sampler
        generator = sampler.generator
        current = generator.get_state() if generator is not None else None
        if self.created > sampler.started:
            # an iterator exists but has not drawn its permutation yet: it will draw from the current state
            return {"generator_state": current, "batches_done": 0}
        # the next epoch's iterator draws a base seed first, unless a persistent worker pool reuses its iterator
        fresh = not (self.persistent_workers and self.num_workers > 0 and self._iterator is not None)
        if sampler.epoch_start_state is None:  # nothing drawn yet
            return {"generator_state": current, "batches_done": 0, "draw_base_seed": fresh}
        done = int(self.progress()) if self.progress is not None else 0
        if 0 <= done < len(sampler):
            return {"generator_state": sampler.epoch_start_state, "batches_done": done}
        return {"generator_state": sampler.epoch_start_state, "batches_done": 0, "replay_epoch": True,
                "draw_base_seed": fresh}

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.pending = dict(state)


class ResumableDistributedSampler(DistributedSampler):
    """torch's DistributedSampler (the shard and the padding Lightning's own gives training) whose next
    iteration can start after the samples already trained on in this epoch.

    The permutation depends only on ``seed`` and the epoch (Lightning calls ``set_epoch``), so a resumed
    rank rebuilds it and skips ``skip`` indices; the samplers of all ranks stay in step.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip = 0  # indices to skip at the next iteration (set by a resume)

    def __iter__(self):
        skip, self.skip = self.skip, 0
        indices = list(super().__iter__())
        return iter(indices[skip:])


class ResumableDistributedDataLoader(DataLoader):
    """A DataLoader over a ``ResumableDistributedSampler`` with ``state_dict``/``load_state_dict``.

    The state is the number of batches of the current epoch that training consumed (``progress()``, as
    for ``ResumableDataLoader``); the epoch itself comes back through Lightning's ``set_epoch``.
    """

    def __init__(self, *args, progress: Callable[[], int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict:
        done = int(self.progress()) if self.progress is not None else 0
        return {"epoch": int(self.sampler.epoch), "batches_done": max(done, 0)}  # -1: epoch complete, skip none

    def load_state_dict(self, state: dict) -> None:
        self.sampler.skip = int(state.get("batches_done", 0)) * int(self.batch_size)


def make_resumable(loader: Any, progress: Callable[[], int] | None, world_size: int = 1, rank: int = 0) -> Any:
    """``loader`` as a ResumableDataLoader with the same batches in the same order, or unchanged.

    Only plain map-style DataLoaders with a Sequential or RandomSampler (without replacement) whose
    generator is the loader's own are converted; anything else is returned as it is. With
    ``world_size`` > 1 the result reads this rank's shard through a ``ResumableDistributedSampler``
    (shuffled with the loader's generator seed when the loader shuffles), so Lightning keeps it.
    """
    if type(loader) is not DataLoader or isinstance(loader.dataset, IterableDataset):
        return loader
    batch_sampler, sampler = loader.batch_sampler, loader.sampler
    if type(batch_sampler) is not BatchSampler or loader.batch_size is None:
        return loader
    if isinstance(sampler, RandomSampler):
        if sampler.replacement or sampler.generator is None or sampler.generator is not loader.generator \
                or sampler._num_samples is not None:
            return loader
    elif not isinstance(sampler, SequentialSampler):
        return loader
    kwargs = dict(num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                  timeout=loader.timeout, worker_init_fn=loader.worker_init_fn, generator=loader.generator,
                  persistent_workers=loader.persistent_workers, pin_memory_device=loader.pin_memory_device)
    if loader.num_workers > 0:
        kwargs.update(prefetch_factor=loader.prefetch_factor, multiprocessing_context=loader.multiprocessing_context)
    if world_size > 1:
        seed = int(loader.generator.initial_seed()) if loader.generator is not None else 0
        shard = ResumableDistributedSampler(loader.dataset, num_replicas=world_size, rank=rank,
                                            shuffle=isinstance(sampler, RandomSampler), seed=seed)
        return ResumableDistributedDataLoader(loader.dataset, batch_size=loader.batch_size, sampler=shard,
                                              drop_last=loader.drop_last, progress=progress, **kwargs)
    resumable = ResumableBatchSampler(sampler, loader.batch_size, loader.drop_last, generator=loader.generator)
    return ResumableDataLoader(loader.dataset, batch_sampler=resumable, progress=progress, **kwargs)


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------
def _check_output_dir(path: str | os.PathLike | None, flag: str) -> None:
    """Refuse an output directory that cannot be created or written, without creating anything."""
    if not path or "://" in str(path):
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise TrainInputError(f"{flag}={path} is a file, not a directory; pass a directory")
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise TrainInputError(f"{flag}={path} cannot be created: {probe} is a file, not a directory; pass another {flag}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise TrainInputError(f"{flag}={path} is not writable ({probe} refuses writes); pass another {flag}")


def _check_config_files(args: list[str]) -> None:
    """``--config`` files exist and are well-formed YAML mappings (jsonargparse's own message spans many lines)."""
    import yaml

    values = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            values.append(args[i + 1])
        elif arg.startswith("--config="):
            values.append(arg.split("=", 1)[1])
    for value in values:
        path = Path(value)
        looks_like_path = "\n" not in value and ":" not in value and ("/" in value or value.endswith((".yaml", ".yml", ".json")))
        if not path.is_file():
            if looks_like_path:
                raise TrainInputError(f"--config {value}: file not found; check the path (configs/experiment/ holds the shipped ones)")
            continue  # inline YAML: jsonargparse parses it
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or type(e).__name__
            raise TrainInputError(f"--config {value}: malformed YAML{where} ({problem}); fix the file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise TrainInputError(f"--config {value}: unreadable ({_one_line(e)}); check the file") from None
        if data is not None and not isinstance(data, dict):
            raise TrainInputError(f"--config {value}: holds a {type(data).__name__}, not a mapping of settings; "
                                  "see configs/experiment/ for the format")


def _parse_error(error: BaseException) -> TrainInputError:
    """jsonargparse's (multi-line) parse error as one line naming the key and the fix."""
    import re

    text = _one_line(error)
    key = (re.search(r"does not accept option '([^']+)'", text) or re.search(r'No action for key "([^"]+)"', text)
           or re.search(r'Key "([^"]+)" is not expected', text) or re.search(r"Unrecognized arguments: (\S+)", text, re.I))
    if key:
        return TrainInputError(f"unknown config key {key.group(1).lstrip('-')!r}; fix its spelling or remove it "
                               "(`train.py fit --help` lists the keys)")
    return TrainInputError(f"{text}; see `train.py fit --help`")


_WRAPPERS = ("Does not validate against any of the Union subtypes", "Problem with given class_path",
             "Invalid subclass spec", "Parser key")


def _root_cause(error: BaseException) -> BaseException:
    """The project's own error inside jsonargparse's wrappers (it wraps what a class raises while built)."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return next((e for e in chain if not str(e).startswith(_WRAPPERS)), error)


def _number(config, key: str):
    value = config
    for part in key.split("."):
        if value is None:
            return None
        value = value.get(part) if hasattr(value, "get") else getattr(value, part, None)
    return value


def _check_values(config) -> None:
    """Hyperparameters with a meaningless value, and outputs that cannot be written, before anything is built."""
    def positive_int(key: str, minimum: int = 1, allow: tuple = ()):
        value = _number(config, key)
        if value is None or value in allow:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise TrainInputError(f"--{key}={value!r} must be an integer >= {minimum}")

    def finite(key: str, low: float, low_open: bool, high: float | None = None, high_open: bool = True):
        value = _number(config, key)
        if value is None:
            return
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (value > low if low_open else value >= low)
        if high is not None:
            ok = ok and (value < high if high_open else value <= high)
        if not ok:
            lo, hi = ("(" if low_open else "["), ("" if high is None else (")" if high_open else "]"))
            span = f"{lo}{low:g}, {'∞)' if high is None else f'{high:g}{hi}'}"
            raise TrainInputError(f"--{key}={value!r} must be a finite number in {span}")

    for key in ("data.batch_size", "data.eval_batch_size", "data.synthetic_train_size", "data.synthetic_test_size"):
        positive_int(key)
    positive_int("data.num_workers", minimum=0)
    positive_int("data.max_val", minimum=0)
    finite("data.val_fraction", 0.0, False, 1.0, True)
    finite("model.init_args.lr", 0.0, True)
    finite("model.init_args.weight_decay", 0.0, False)
    positive_int("model.init_args.warmup_steps", minimum=0)
    positive_int("trainer.max_steps", allow=(-1,))
    positive_int("trainer.max_epochs", allow=(-1,))
    data_dir = _number(config, "data.data_dir")
    if data_dir and not Path(data_dir).is_dir():
        raise TrainInputError(f"--data.data_dir={data_dir} is not a directory; pass the task's local data folder "
                              "or leave it unset (hub / synthetic)")
    _check_output_dir(_number(config, "trainer.default_root_dir"), "--trainer.default_root_dir")
    logger = _number(config, "trainer.logger")
    for item in logger if isinstance(logger, list) else [logger]:
        init = _number(item, "init_args") if item is not None and not isinstance(item, bool) else None
        if init is not None:
            _check_output_dir(_number(init, "save_dir"), "--trainer.logger.init_args.save_dir")
    callbacks = _number(config, "trainer.callbacks") or []
    for item in callbacks if isinstance(callbacks, list) else [callbacks]:
        init = _number(item, "init_args")
        if init is None:
            continue
        if _number(init, "dirpath"):
            _check_output_dir(_number(init, "dirpath"), "ModelCheckpoint dirpath")
        if str(_number(item, "class_path") or "").endswith("ExportEncoder") and _number(init, "path"):
            export = Path(_number(init, "path"))
            if export.is_dir():
                raise TrainInputError(f"ExportEncoder path={export} is a directory; pass a file such as "
                                      f"{export / 'encoder.safetensors'}")
            _check_output_dir(export.parent, "ExportEncoder path")
        if str(_number(item, "class_path") or "").endswith("MergeEvaluate"):
            # the pool is read at the first evaluation, after training steps: check it now
            from merging.io import MergeInputError, SafetensorsReader

            for path in _number(init, "pool") or []:
                try:
                    SafetensorsReader(path).close()
                except MergeInputError as e:
                    raise TrainInputError(f"MergeEvaluate pool: {e}") from None


def _check_checkpoint(path: str) -> None:
    """``--ckpt_path`` exists and loads with ``weights_only=True`` (tensors and plain containers only)."""
    file = Path(path)
    if file.is_dir():
        raise TrainInputError(f"--ckpt_path {path} is a directory; pass its checkpoints/last.ckpt")
    if not file.is_file():
        raise TrainInputError(f"--ckpt_path {path}: file not found; pass an existing .ckpt or 'last'")
    try:
        try:
            checkpoint = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise TrainInputError(f"--ckpt_path {path} holds Python objects other than tensors and plain containers; "
                              "refused (unpickling could run code): resume only from checkpoints this tool wrote") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise TrainInputError(f"--ckpt_path {path} is not a readable checkpoint ({_one_line(e).split('. ')[0]}); it may be "
                              "truncated: use another (e.g. an earlier version_*/checkpoints/last.ckpt)") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise TrainInputError(f"--ckpt_path {path} is not a Lightning checkpoint (no state_dict); pass a .ckpt "
                              "written by train.py")


def _find_last_checkpoint(config) -> str | None:
    """The newest ``last*.ckpt`` among this run's logger versions, or ``hpc_ckpt_*.ckpt`` in its
    ``default_root_dir`` (written by SLURM auto-requeue), whichever is newer (``--ckpt_path last``).

    Lightning itself only looks in the *new* version directory, where there is never one yet, and
    takes its hpc checkpoint only when no ``ckpt_path`` is given.
    """
    dirs = []
    callbacks = _number(config, "trainer.callbacks") or []
    for item in callbacks if isinstance(callbacks, list) else [callbacks]:
        init = _number(item, "init_args")
        if init is not None and _number(init, "dirpath"):
            dirs.append(Path(_number(init, "dirpath")))
    logger = _number(config, "trainer.logger")
    first = logger[0] if isinstance(logger, list) and logger else logger
    init = _number(first, "init_args") if first is not None and not isinstance(first, bool) else None
    root = _number(config, "trainer.default_root_dir") or "."
    if init is not None and _number(init, "save_dir"):
        base = Path(_number(init, "save_dir")) / str(_number(init, "name") or "lightning_logs")
    else:
        base = Path(root) / "lightning_logs"
    candidates = [Path(p) for d in dirs for p in glob.glob(str(d / "last*.ckpt"))]
    candidates += [Path(p) for p in glob.glob(str(base / "*" / "checkpoints" / "last*.ckpt"))]  # any version name
    candidates += [Path(p) for p in glob.glob(str(Path(root) / "hpc_ckpt_*.ckpt"))]
    candidates = [c for c in candidates if c.is_file()]
    return str(max(candidates, key=lambda p: p.stat().st_mtime)) if candidates else None


def _single_process(trainer_cfg) -> bool:
    """Whether the trainer config describes one process on one device (no DDP launch)."""
    if trainer_cfg is None:
        return False
    if (_number(trainer_cfg, "num_nodes") or 1) != 1:
        return False
    devices = _number(trainer_cfg, "devices")
    if devices in (1, "1") or (isinstance(devices, (list, tuple)) and len(devices) == 1):
        return True
    return devices in ("auto", None) and _number(trainer_cfg, "accelerator") == "cpu"  # auto on CPU: one device


# ---------------------------------------------------------------------------------------------
# SLURM: auto-requeue at a batch boundary
# ---------------------------------------------------------------------------------------------
class SLURMRequeue(Callback):
    """Lightning's SLURM auto-requeue (``SLURMEnvironment(auto_requeue=True)``), acted on at a batch end.

    Lightning's handler for the requeue signal (SIGUSR1; ``sbatch --signal=SIGUSR1@90``) saves
    ``hpc_ckpt_<n>.ckpt`` in ``default_root_dir`` and runs ``scontrol requeue`` inside the signal handler,
    i.e. at whatever line each rank is executing: mid-step (a checkpoint whose weights and progress
    disagree) or, under DDP, between collectives (its barrier then meets another rank's all-reduce).
    Here the signal only sets a flag. At the end of every training batch the ranks sum their flags
    (one all-reduce of one integer); once any rank has it, all run Lightning's handler at that same
    point, where a checkpoint is as consistent as ModelCheckpoint's, then wait up to ``wait_s`` for
    SLURM's SIGTERM and stop (no export: the requeued job finishes the run). Inactive outside SLURM
    or without auto-requeue.
    """

    def __init__(self, wait_s: float = 120.0):
        self.wait_s = wait_s
        self.signum: int | None = None
        self.requested = False
        self.requeued = False
        self._lightning_handler = None

    def on_train_start(self, trainer, pl_module) -> None:
        from lightning.fabric.plugins.environments import SLURMEnvironment
        from lightning.pytorch.trainer.connectors.signal_connector import _HandlersCompose

        env = trainer._accelerator_connector.cluster_environment
        if not (isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal is not None):
            return
        handler = signal.getsignal(env.requeue_signal)
        if not isinstance(handler, _HandlersCompose):  # Lightning did not register one (another handler was there)
            return
        self.signum, self._lightning_handler = env.requeue_signal, handler
        signal.signal(env.requeue_signal, self._note)

    def _note(self, signum, frame) -> None:
        self.requested = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._lightning_handler is None or self.requeued:
            return
        flag = torch.tensor([int(self.requested)], device=pl_module.device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="sum")
        if not int(flag.item()):
            return
        self.requeued = True
        print(f"train.py: requeue signal: checkpoint at step {trainer.global_step}, then scontrol requeue",
              file=sys.stderr, flush=True)
        self._lightning_handler(self.signum, None)  # hpc checkpoint on every rank, requeue from rank 0
        deadline = time.monotonic() + self.wait_s
        while time.monotonic() < deadline and not trainer.received_sigterm:
            time.sleep(0.2)  # SLURM's SIGTERM interrupts the sleep; Lightning's handler sets the flag
        if trainer.received_sigterm:
            from lightning.pytorch.utilities.exceptions import SIGTERMException

            raise SIGTERMException()  # stops fit on every rank: the requeued job continues the run
        print(f"train.py: warning: no SIGTERM {self.wait_s:g} s after the requeue request; training on",
              file=sys.stderr, flush=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._lightning_handler is not None and self.signum is not None:
            signal.signal(self.signum, self._lightning_handler)


# ---------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------
class _RunTracker(Callback):
    """Whether this process finished a training batch (a failed run without one leaves no log directory)."""

    def __init__(self):
        self.trained = False

    def on_train_batch_end(self, *args, **kwargs) -> None:
        self.trained = True


class BadMergingCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        self._fresh_log_dir: Path | None = None
        self._tracker = _RunTracker()
        self._requeue = SLURMRequeue()
        try:
            super().__init__(*args, **kwargs)
        except argparse.ArgumentError as e:
            raise _parse_error(e) from None
        except BaseException as error:
            self._remove_partial_outputs()
            root = _root_cause(error)
            if root is not error:
                raise root.with_traceback(root.__traceback__) from None
            raise

    def add_arguments_to_parser(self, parser):
        # One task name drives both the head (model) and the data.
        parser.link_arguments("data.task", "model.init_args.task")
        parser.link_arguments("model.init_args.model_name", "data.model_name")
        parser.link_arguments("model.init_args.cache_dir", "data.cache_dir")

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        if not sub:
            return
        config = self.config[sub]
        ckpt = config.get("ckpt_path")
        if ckpt == "last":
            found = _find_last_checkpoint(config)
            if found is not None:
                config["ckpt_path"] = ckpt = found
                print(f"train.py: resuming from {found}", file=sys.stderr)
            else:  # as Lightning does: nothing to resume from is not an error (re-queued cluster jobs)
                config["ckpt_path"] = ckpt = None
                print("train.py: warning: --ckpt_path last found no last.ckpt under this run's logger directory; "
                      "starting from the base model", file=sys.stderr)
        if ckpt and ckpt not in CKPT_KEYWORDS and not str(ckpt).startswith("registry"):
            _check_checkpoint(str(ckpt))  # before Lightning reads the checkpoint's hyperparameters

    def before_instantiate_classes(self) -> None:
        sub = self.config.get("subcommand")
        _check_values(self.config[sub] if sub else self.config)

    def instantiate_trainer(self, **kwargs):
        """Load the data before the trainer exists: data problems (missing columns, empty or too small
        splits) stop the run before anything is logged or written. Single-process runs only: under DDP
        Lightning prepares the data on one rank and sets it up on all."""
        sub = self.config.get("subcommand")
        trainer_cfg = (self.config[sub] if sub else self.config).get("trainer")
        if sub == "fit" and isinstance(self.datamodule, TaskDataModule) and _single_process(trainer_cfg):
            datamodule = self.datamodule
            datamodule.prepare_data()
            datamodule.setup("fit")
            n_train, batch = len(datamodule.splits["train"]), datamodule.hparams.batch_size
            if n_train < batch:
                raise TrainInputError(f"task {datamodule.spec.name}: the train split has {n_train} examples, fewer "
                                      f"than one batch of {batch} (the last partial batch is dropped); lower "
                                      "--data.batch_size or add data")
        return super().instantiate_trainer(**kwargs)

    def fit(self, model, datamodule=None, **kwargs):
        """``trainer.fit`` with weights-only checkpoint loading, atomic checkpoints and a resumable data order."""
        trainer = self.trainer
        if "weights_only" in kwargs:
            kwargs["weights_only"] = True
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if isinstance(datamodule, TaskDataModule) and not trainer.overfit_batches:
            self._make_train_loader_resumable(datamodule)
        log_dir = trainer.log_dir
        if trainer.is_global_zero and log_dir and not Path(log_dir).exists():
            self._fresh_log_dir = Path(log_dir)
        trainer.callbacks.extend([self._tracker, self._requeue])
        return trainer.fit(model, datamodule=datamodule, **kwargs)

    def _make_train_loader_resumable(self, datamodule) -> None:
        original = datamodule.train_dataloader
        trainer = self.trainer

        def progress() -> int:
            """Batches of this epoch that training has processed; -1 once the epoch is complete."""
            done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            return done if done < trainer.num_training_batches else -1

        def train_dataloader():
            # called after the DDP launch, so world size and rank are this process's
            return make_resumable(original(), progress, trainer.world_size, trainer.global_rank)

        datamodule.train_dataloader = train_dataloader

    def _remove_partial_outputs(self) -> None:
        """A run that failed before its first training batch removes the log directory it created."""
        fresh = self._fresh_log_dir
        if fresh is None or self._tracker.trained or not fresh.is_dir():
            return
        if any(fresh.rglob("*.ckpt")):
            return
        shutil.rmtree(fresh, ignore_errors=True)


def main(args=None):
    """Run the CLI and return it; bad input raises a typed exception (a ValueError subclass)."""
    _check_config_files(list(sys.argv[1:] if args is None else args))
    no_exit = {"exit_on_error": False}  # parse errors raise, and become one line in cli_main
    return BadMergingCLI(
        FineTune,
        TaskDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={**no_exit, **{s: dict(no_exit) for s in ("fit", "validate", "test", "predict")}},
        args=args,
    )


USER_ERRORS = (ValueError, OSError, FloatingPointError, argparse.ArgumentError, pickle.UnpicklingError)


def cli_main(argv=None) -> int:
    """``python train.py ...``: exit status 0, or 2 with one line ``train.py: error: ...`` on stderr.

    ``BADMERGING_TRACEBACK=1`` re-raises instead, with the full traceback.
    """
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        main(argv)
    except SIGTERMException:  # SLURM requeue or scancel: the checkpoints stay for the resumed run
        print("train.py: stopped by SIGTERM; resume with --ckpt_path last (a requeued SLURM job does)", file=sys.stderr)
        return 143
    except USER_ERRORS as e:
        if os.environ.get("BADMERGING_TRACEBACK"):
            raise
        if isinstance(e, argparse.ArgumentError):
            e = _parse_error(e)
        print(f"train.py: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
