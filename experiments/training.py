"""Training through LightningCLI, in-process: ``main(argv)`` returns the CLI, ``cli_main(argv)`` an exit status.

``train.py`` is these two functions; the experiment engine calls ``main`` directly. Any LightningModule
(``--model FineTune``, ``--model BackdoorInjection``, ``--model UniversalTrigger`` or a class path) trains on
``ResumableTaskDataModule``. Reliability (ERRORS.md lists every refused input):

- bad input (config, task, data, weights, checkpoint, hyperparameter, output location) stops the run
  before training: ``main`` raises a typed ``ValueError`` subclass (``TrainInputError``, ``DatasetError``,
  ``ModelLoadError``, ...), ``cli_main`` prints one line ``train.py: error: ...`` and returns 2
  (``BADMERGING_TRACEBACK=1`` re-raises). A run that fails before its first training batch removes the log
  directory it created.
- checkpoints are written atomically (``callbacks.checkpointing.AtomicCheckpointIO``, a plugin passed through
  ``trainer_defaults``; a ``--trainer.plugins`` of your own replaces it) and read with ``weights_only=True``;
- the position inside the epoch is part of every checkpoint (``datamodules.resumable``), so a run killed
  mid-epoch and resumed with ``--ckpt_path`` ends with the same weights as an uninterrupted run;
- under SLURM the requeue signal is acted on at a batch end all ranks agree on (``callbacks.requeue``);
  ``--ckpt_path last`` finds the newest ``last*.ckpt`` of the run's logger or Lightning's ``hpc_ckpt_*.ckpt``;
- task identity: the logger's run folder is named by task (``<name>_<task>``), ``--ckpt_path last`` takes only
  checkpoints of ``--data.task``, and an explicit ``--ckpt_path`` (fit, validate, test) of another task is refused;
- ``--trainer.accelerator`` / ``--trainer.devices`` are checked against this machine before anything is built;
- Ctrl-C stops with one line ``train.py: interrupted; ...`` naming the checkpoint kept (exit status 130);
- ``--tasks_file PATH`` (repeatable) registers tasks of your own before the rest is parsed (``experiments.cli``);
- ``--reference_epochs true`` trains ``--data.task`` for its epochs in the reference recipe (``REFERENCE_EPOCHS``) as
  ``trainer.max_epochs``; a positive ``--trainer.max_steps`` still stops the run earlier (Lightning stops at the first);
- conventions: integer ``val_check_interval`` / ``log_every_n_steps`` above ``max_steps`` are clamped to it
  (a short run still validates and logs); ``--optimizer`` / ``--lr_scheduler`` are refused (the module's recipe
  is what the export's metadata records); ``train.py fit ...`` builds only the fit parser (faster ``--help``).
"""

from __future__ import annotations

import argparse
import glob
import math
import pickle
import re
import shutil
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch import Callback
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

# imported so that jsonargparse resolves the short names --model FineTune / BackdoorInjection / UniversalTrigger
import lightning_modules.finetune  # noqa: F401
import lightning_modules.injection  # noqa: F401
import lightning_modules.trigger_generation  # noqa: F401
from callbacks.requeue import SLURMRequeue
from datamodules.datamodule import TaskDataModule
from datamodules.resumable import ResumableTaskDataModule
from experiments.cli import (TASKS_FILE_FLAG, TASKS_FILE_HELP, Interrupted, UserError, check_config_files,
                             check_output_path, one_line, parse_error_line, run_cli, take_tasks_files)

__all__ = ["REFERENCE_EPOCHS", "TrainInputError", "TrainingCLI", "checkpoint_task", "main", "cli_main"]

PROG = "train.py"
HELP = "`train.py fit --help`"
CKPT_KEYWORDS = ("last", "best", "hpc")
ATOMIC_IO = {"class_path": "callbacks.checkpointing.AtomicCheckpointIO"}  # a config entry: config.yaml stays loadable

#: Epochs per task of the reference fine-tuning recipe (batch 128, AdamW lr 1e-5, wd 0.1, 500 warm-up steps, cosine):
#: the ``epochs`` table of jzhang538/BadMerging ``src/finetune_clean.py`` (the same in its
#: ``finetune_backdoor_badmerging{on,off}.py``, used for the adversary task), "follow Task-Arithmetic paper (around 2k
#: iterations)": mlfoundations/task_vectors' per-task epochs for Cars, DTD, EuroSAT, GTSRB, MNIST, RESISC45, SUN397, SVHN.
#: Keys are this project's task names. The reference trains on the whole official train split; ours holds out the val
#: split (10%, at most 5000) and drops the last partial batch, so an epoch has slightly fewer steps (CIFAR-100:
#: 351 × 5 = 1755 steps instead of 391 × 5 = 1955).
REFERENCE_EPOCHS = {"stanford_cars": 35, "dtd": 76, "eurosat": 12, "gtsrb": 11, "mnist": 5, "resisc45": 15, "sun397": 14,
                    "svhn": 4, "stl10": 5, "cifar100": 5, "flowers102": 251, "oxford_pets": 77, "imagenet100": 3}


class TrainInputError(UserError):
    """An input of ``train.py`` that cannot be used; the one-line message names it and the fix."""


def _get(config, key: str):
    """``config[a][b]...`` for the dotted ``key`` (dicts, Namespaces or objects); None where a part is missing."""
    value = config
    for part in key.split("."):
        if value is None:
            return None
        value = value.get(part) if hasattr(value, "get") else getattr(value, part, None)
    return value


def _items(value) -> list:
    return value if isinstance(value, list) else [] if value is None else [value]


def _init_args(item):
    """``init_args`` of a class entry (logger, callback), or None (also for ``logger: false``)."""
    return _get(item, "init_args") if item is not None and not isinstance(item, bool) else None


# ---------------------------------------------------------------------------------------------
# Parse errors
# ---------------------------------------------------------------------------------------------
def _parse_error(error: BaseException) -> TrainInputError:
    """jsonargparse's (multi-line) parse error as one line naming the key and the fix (train's wording)."""
    line = parse_error_line(error, HELP)
    key = re.match(r"unknown option or config key (.+?); fix its spelling or remove it", line)
    if key:
        return TrainInputError(f"unknown config key {key.group(1)}; fix its spelling or remove it ({HELP} lists the keys)")
    return TrainInputError(line)


def _format_error(error: BaseException) -> str:
    return one_line(_parse_error(error) if isinstance(error, argparse.ArgumentError) else error)


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


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------
def _check_output(path, flag: str, is_dir: bool = True) -> None:
    """``merging.io.check_output_path`` in train's ``flag=value`` spelling; remote (``://``) paths pass."""
    if not path or "://" in str(path):
        return
    named = f"{flag} {Path(path)}"
    check_output_path(path, flag, is_dir=is_dir,
                      error=lambda message: TrainInputError(message.replace(named, f"{flag}={Path(path)}", 1)))


def _check_numbers(config) -> None:
    """Hyperparameters with a meaningless value (the keys every shipped module and the data share)."""
    def integer(key: str, minimum: int = 1, allow: tuple = ()):
        value = _get(config, key)
        if value is None or value in allow:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise TrainInputError(f"--{key}={value!r} must be an integer >= {minimum}")

    def finite(key: str, low: float, low_open: bool, high: float | None = None, high_open: bool = True):
        value = _get(config, key)
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
        integer(key)
    integer("data.num_workers", minimum=0)
    integer("data.max_val", minimum=0)
    finite("data.val_fraction", 0.0, False, 1.0, True)
    finite("model.init_args.lr", 0.0, True)
    finite("model.init_args.weight_decay", 0.0, False)
    integer("model.init_args.warmup_steps", minimum=0)
    integer("trainer.max_steps", allow=(-1,))
    integer("trainer.max_epochs", allow=(-1,))


def _check_callbacks(config) -> None:
    """Outputs of ModelCheckpoint / ExportEncoder, and the MergeEvaluate pool (read only after training steps)."""
    for item in _items(_get(config, "trainer.callbacks")):
        init = _init_args(item)
        if init is None:
            continue
        class_path = str(_get(item, "class_path") or "")
        if _get(init, "dirpath"):
            _check_output(_get(init, "dirpath"), "ModelCheckpoint dirpath")
        if class_path.endswith("ExportEncoder") and _get(init, "path"):
            export = Path(_get(init, "path"))
            if export.is_dir():
                raise TrainInputError(f"ExportEncoder path={export} is a directory; pass a file such as "
                                      f"{export / 'encoder.safetensors'}")
            _check_output(export, "ExportEncoder path", is_dir=False)
        if class_path.endswith("MergeEvaluate"):
            from merging.io import MergeInputError, SafetensorsReader

            for path in _get(init, "pool") or []:
                try:
                    SafetensorsReader(path).close()
                except MergeInputError as e:
                    raise TrainInputError(f"MergeEvaluate pool: {e}") from None


def _check_accelerator(trainer) -> None:
    """``--trainer.accelerator`` named (gpu, cuda, mps, tpu) on a machine that lacks it, or ``--trainer.devices``
    beyond what it has: refused here, before any data or model is built (Lightning finds out only in the Trainer)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.accelerators import AcceleratorRegistry, CUDAAccelerator, MPSAccelerator

    value = _get(trainer, "accelerator")
    if not isinstance(value, str) or value in ("auto", "cpu"):  # None, "auto", or an Accelerator class entry
        return
    known = sorted(AcceleratorRegistry.available_accelerators())
    if value == "gpu":
        candidates, what = [CUDAAccelerator, MPSAccelerator], "GPU (CUDA or MPS)"
    elif value in known:
        names = {"cuda": "CUDA GPU", "mps": "MPS (Apple GPU)", "tpu": "TPU"}
        candidates, what = [AcceleratorRegistry[value]["accelerator"]], names.get(value, f"{value} device")
    else:
        raise TrainInputError(f"--trainer.accelerator={value!r} is unknown; use auto, gpu or one of {', '.join(known)}")
    available = [c for c in candidates if c.is_available()]
    if not available:
        raise TrainInputError(f"--trainer.accelerator={value}: torch finds no {what} on this machine; use "
                              "--trainer.accelerator cpu, or auto (a GPU when there is one)")
    devices = _get(trainer, "devices")
    if devices in (None, "auto"):
        return
    try:
        available[0].parse_devices(devices)
    except (MisconfigurationException, ValueError, TypeError):  # Lightning's text lists every requested id
        count = available[0].auto_device_count()
        raise TrainInputError(f"--trainer.devices={devices} does not fit this machine, which has {count} {what}(s) "
                              f"(ids 0..{count - 1}); pass a count up to {count}, ids among them, or auto") from None


def _check_values(config) -> None:
    """Meaningless hyperparameters, a missing data directory and unwritable outputs, before anything is built."""
    _check_numbers(config)
    _check_accelerator(_get(config, "trainer"))
    data_dir = _get(config, "data.data_dir")
    if data_dir and not Path(data_dir).is_dir():
        raise TrainInputError(f"--data.data_dir={data_dir} is not a directory; pass the task's local data folder "
                              "or leave it unset (hub / synthetic)")
    _check_output(_get(config, "trainer.default_root_dir"), "--trainer.default_root_dir")
    for item in _items(_get(config, "trainer.logger")):
        _check_output(_get(_init_args(item), "save_dir"), "--trainer.logger.init_args.save_dir")
    _check_callbacks(config)


def _read_checkpoint(path: str) -> dict:
    """``--ckpt_path`` loaded with ``weights_only=True`` (tensors and plain containers only), memory-mapped."""
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
        raise TrainInputError(f"--ckpt_path {path} is not a readable checkpoint ({one_line(e).split('. ')[0]}); it may be "
                              "truncated: use another (e.g. an earlier version_*/checkpoints/last.ckpt)") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise TrainInputError(f"--ckpt_path {path} is not a Lightning checkpoint (no state_dict); pass a .ckpt "
                              "written by train.py")
    return checkpoint


def checkpoint_task(checkpoint: dict) -> str | None:
    """The task a checkpoint was trained on: its datamodule's hyperparameters, else its module's (None if neither)."""
    for key in ("datamodule_hyper_parameters", "hyper_parameters"):
        hparams = checkpoint.get(key)
        if isinstance(hparams, dict) and isinstance(hparams.get("task"), str):
            return hparams["task"]
    return None


def _check_checkpoint(path: str, task: str | None) -> None:
    """``--ckpt_path`` is a readable Lightning checkpoint of ``task`` (``--data.task``)."""
    theirs = checkpoint_task(_read_checkpoint(path))
    if task and theirs and theirs != task:
        raise TrainInputError(f"--ckpt_path {path} is a checkpoint of task {theirs}, not of --data.task {task}; pass "
                              f"--data.task {theirs} or a checkpoint of a {task} run")


def _find_last_checkpoint(config) -> str | None:
    """The newest ``last*.ckpt`` of this task among this run's logger versions (and ModelCheckpoint dirpaths), or
    ``hpc_ckpt_*.ckpt`` in its ``default_root_dir`` (SLURM auto-requeue), whichever is newer.

    Lightning itself only looks in the *new* version directory, where there is never one yet, and
    takes its hpc checkpoint only when no ``ckpt_path`` is given. The logger's folder is named by task
    (``_name_runs_by_task``); checkpoints in shared folders (dirpath, default_root_dir) of another task are skipped.
    """
    dirs = [Path(_get(_init_args(item), "dirpath")) for item in _items(_get(config, "trainer.callbacks"))
            if _get(_init_args(item), "dirpath")]
    loggers = _items(_get(config, "trainer.logger"))
    init = _init_args(loggers[0]) if loggers else None
    root = _get(config, "trainer.default_root_dir") or "."
    if _get(init, "save_dir"):
        base = Path(_get(init, "save_dir")) / str(_get(init, "name") or "lightning_logs")
    else:
        base = Path(root) / "lightning_logs"
    candidates = [Path(p) for d in dirs for p in glob.glob(str(d / "last*.ckpt"))]
    candidates += [Path(p) for p in glob.glob(str(base / "*" / "checkpoints" / "last*.ckpt"))]  # any version name
    candidates += [Path(p) for p in glob.glob(str(Path(root) / "hpc_ckpt_*.ckpt"))]
    task = _get(config, "data.task")
    for candidate in sorted((c for c in candidates if c.is_file()), key=lambda p: p.stat().st_mtime, reverse=True):
        theirs = checkpoint_task(_read_checkpoint(str(candidate)))
        if not task or not theirs or theirs == task:
            return str(candidate)
    return None


def _name_runs_by_task(config) -> None:
    """Append ``_<task>`` to the logger's ``name`` unless it already names the task, so that every task's runs
    live in their own folder (``outputs/finetune/embedded_shapes/version_N``) and ``--ckpt_path last`` stays in it."""
    task = _get(config, "data.task")
    for item in _items(_get(config, "trainer.logger")):
        init = _init_args(item)
        if not task or init is None or "name" not in init:  # loggers without a run name (e.g. WandbLogger's project)
            continue
        name = str(init["name"] or "lightning_logs")
        if not re.search(rf"(^|[/_.-]){re.escape(task)}($|[/_.-])", name):
            init["name"] = f"{name}_{task}"


def _check_recipe(config) -> None:
    """``--optimizer`` / ``--lr_scheduler`` would replace the module's own optimiser and schedule while its export
    metadata still records the module's recipe: refused, pointing at the module's own arguments."""
    for key in ("optimizer", "lr_scheduler"):
        if _get(config, key) is not None:
            raise TrainInputError(f"--{key} would replace the module's own recipe (AdamW + warm-up/cosine; "
                                  "UniversalTrigger: its optimizer argument) while the export's metadata still records "
                                  "it; refused: set --model.init_args.lr / --model.init_args.weight_decay / "
                                  "--model.init_args.warmup_steps (UniversalTrigger: --model.init_args.optimizer) instead")


def _follow_max_steps(config) -> None:
    """Clamp ``val_check_interval`` / ``log_every_n_steps`` (integers) to a smaller ``max_steps`` so that a short
    run still validates and logs (at its last step); one info line says so."""
    trainer = _get(config, "trainer")
    max_steps = _get(trainer, "max_steps")
    if trainer is None or isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps <= 0:
        return
    clamped = []
    for key in ("val_check_interval", "log_every_n_steps"):
        value = _get(trainer, key)
        if isinstance(value, int) and not isinstance(value, bool) and value > max_steps:
            trainer[key] = max_steps
            clamped.append(f"{key} {value} -> {max_steps}")
    if clamped:
        # Lightning's own info channel (rank zero only, beside "GPU available: ..."), not an error line
        rank_zero_info(f"{PROG}: --trainer.max_steps {max_steps} is below the configured interval "
                       f"({', '.join(clamped)}); validating and logging at the last step")


def _apply_reference_epochs(config) -> None:
    """``reference_epochs: true``: ``trainer.max_epochs`` = the task's ``REFERENCE_EPOCHS`` (refused for a task without
    one, naming the fix); ``trainer.max_steps`` is left as configured (-1: the epochs decide; N > 0 stops earlier)."""
    if not _get(config, "reference_epochs"):
        return
    task = _get(config, "data.task")
    if task not in REFERENCE_EPOCHS:
        raise TrainInputError(f"--reference_epochs true: task {task} has no epoch count in the reference recipe (it has "
                              f"{', '.join(sorted(REFERENCE_EPOCHS))}); pass --reference_epochs false with "
                              "--trainer.max_steps or --trainer.max_epochs")
    config["trainer"]["max_epochs"] = REFERENCE_EPOCHS[task]


def _single_process(trainer_cfg) -> bool:
    """Whether the trainer config describes one process on one device (no DDP launch)."""
    if trainer_cfg is None or (_get(trainer_cfg, "num_nodes") or 1) != 1:
        return False
    devices = _get(trainer_cfg, "devices")
    if devices in (1, "1") or (isinstance(devices, (list, tuple)) and len(devices) == 1):
        return True
    return devices in ("auto", None) and _get(trainer_cfg, "accelerator") == "cpu"  # auto on CPU: one device


# ---------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------
def _weights_only(kwargs: dict) -> dict:
    """A trainer method's kwargs loading ``ckpt_path`` with ``weights_only=True`` (tensors and plain containers)."""
    return {**kwargs, "weights_only": True} if "weights_only" in kwargs else kwargs


class _RunTracker(Callback):
    """Whether this process finished a training batch (a failed run without one leaves no log directory)."""

    def __init__(self):
        self.trained = False

    def on_train_batch_end(self, *args, **kwargs) -> None:
        self.trained = True


class TrainingCLI(LightningCLI):
    """LightningCLI with the input checks above, atomic checkpoints, SLURM requeue and partial-output cleanup.

    ``trainer_defaults`` gain the ``AtomicCheckpointIO`` plugin (unless they name plugins) and the
    ``_RunTracker`` / ``SLURMRequeue`` callbacks; bad input raises the typed error (see the module docstring).
    """

    def __init__(self, *args, trainer_defaults: dict | None = None, only_subcommand: str | None = None, **kwargs):
        self._only_subcommand = only_subcommand
        self._fresh_log_dir: Path | None = None
        self._tracker = _RunTracker()
        defaults = dict(trainer_defaults or {})
        defaults.setdefault("plugins", [dict(ATOMIC_IO)])
        defaults["callbacks"] = [*_items(defaults.get("callbacks")), self._tracker, SLURMRequeue()]
        try:
            super().__init__(*args, trainer_defaults=defaults, **kwargs)
        except argparse.ArgumentError as e:
            raise _parse_error(e) from None
        except BaseException as error:
            self._remove_partial_outputs()
            if isinstance(error, Interrupted):
                error.detail = self._interrupted_detail()
                raise
            root = _root_cause(error)
            if root is not error:
                raise root.with_traceback(root.__traceback__) from None
            raise

    def subcommands(self) -> dict[str, set[str]]:
        """Lightning's subcommands, or only ``only_subcommand``: building each subcommand's parser inspects every
        class signature again (~0.15 s each), and ``train.py fit ...`` never uses the other three."""
        every = LightningCLI.subcommands()
        only = self._only_subcommand
        return {only: every[only]} if only in every else every

    def add_arguments_to_parser(self, parser):
        # One task name drives both the head (model) and the data.
        parser.link_arguments("data.task", "model.init_args.task")
        parser.link_arguments("model.init_args.model_name", "data.model_name")
        parser.link_arguments("model.init_args.cache_dir", "data.cache_dir")
        parser.add_argument("--reference_epochs", type=bool, default=False,
                            help="train --data.task for its epochs in the reference recipe (experiments.training."
                                 "REFERENCE_EPOCHS) as trainer.max_epochs; a positive trainer.max_steps stops earlier")

    def parse_arguments(self, parser, args) -> None:
        with warnings.catch_warnings():
            # main() passes sys.argv[1:] without its --tasks_file options on purpose (DDP ranks re-run sys.argv as is)
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        if not sub:
            _check_values(self.config)
            return
        config = self.config[sub]
        _check_recipe(config)
        _apply_reference_epochs(config)
        _name_runs_by_task(config)
        _check_values(config)  # here, not in before_instantiate_classes: before Lightning seeds (and says so on stderr)
        ckpt = config.get("ckpt_path")
        if ckpt == "last":
            found = _find_last_checkpoint(config)
            config["ckpt_path"] = ckpt = found
            if found is not None:
                print(f"{PROG}: resuming from {found}", file=sys.stderr)
            else:  # as Lightning does: nothing to resume from is not an error (re-queued cluster jobs)
                print(f"{PROG}: warning: --ckpt_path last found no last.ckpt of task {_get(config, 'data.task')} under "
                      "this run's logger directory; starting from the base model", file=sys.stderr)
        if ckpt and ckpt not in CKPT_KEYWORDS and not str(ckpt).startswith("registry"):
            _check_checkpoint(str(ckpt), _get(config, "data.task"))  # before Lightning reads its hyperparameters

    def before_instantiate_classes(self) -> None:
        sub = self.config.get("subcommand")
        _follow_max_steps(self.config[sub] if sub else self.config)  # before the Trainer is built from it

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
        """``trainer.fit`` loading checkpoints weights-only; notes the log directory this run creates."""
        trainer = self.trainer
        kwargs = _weights_only(kwargs)
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank asks
        if trainer.is_global_zero and log_dir and not Path(log_dir).exists():
            self._fresh_log_dir = Path(log_dir)
        return trainer.fit(model, datamodule=datamodule, **kwargs)

    def validate(self, model, datamodule=None, **kwargs):
        return self.trainer.validate(model, datamodule=datamodule, **_weights_only(kwargs))

    def test(self, model, datamodule=None, **kwargs):
        return self.trainer.test(model, datamodule=datamodule, **_weights_only(kwargs))

    def predict(self, model, datamodule=None, **kwargs):
        return self.trainer.predict(model, datamodule=datamodule, **_weights_only(kwargs))

    def _interrupted_detail(self) -> str:
        """What a Ctrl-C left: the checkpoint ``--ckpt_path last`` would resume from, or that nothing was trained."""
        config = getattr(self, "config", None)
        sub = config.get("subcommand") if config is not None else None
        if sub != "fit":
            return "nothing was written; rerun the command" if sub else "nothing was trained; rerun the command"
        try:
            found = _find_last_checkpoint(config[sub])
        except (ValueError, OSError):  # an unreadable candidate: say nothing about it here
            found = None
        if found is not None:
            return f"the last checkpoint {found} is kept; resume with the same command plus --ckpt_path last"
        if not self._tracker.trained:
            removed = " (its new log directory was removed)" if self._fresh_log_dir is not None else ""
            return f"nothing was trained{removed}; rerun the command"
        log_dir = self._fresh_log_dir or getattr(getattr(self, "trainer", None), "log_dir", None)
        return (f"no checkpoint was saved yet (ModelCheckpoint writes one every few steps; logs in {log_dir}); rerun the "
                "command to start over")

    def _remove_partial_outputs(self) -> None:
        """A run that failed before its first training batch removes the log directory it created."""
        fresh = self._fresh_log_dir
        if fresh is None or self._tracker.trained or not fresh.is_dir() or any(fresh.rglob("*.ckpt")):
            return
        shutil.rmtree(fresh, ignore_errors=True)


TASKS_FILE_EPILOG = (f"{TASKS_FILE_FLAG} PATH: {TASKS_FILE_HELP}. Not a config key: train.py takes it out of the command "
                     "line before LightningCLI reads the rest.")


def main(args=None) -> TrainingCLI:
    """Run the CLI on ``args`` (default ``sys.argv[1:]``) and return it; bad input raises a typed exception."""
    argv, _files = take_tasks_files(sys.argv[1:] if args is None else args, error=TrainInputError)
    check_config_files(argv, shipped="configs/experiment/", error=TrainInputError)
    # `train.py fit ...` (the subcommand first, as the engine and the README call it): build only fit's parser
    only = argv[0] if argv and argv[0] in LightningCLI.subcommands() else None
    sub_kwargs = {"exit_on_error": False, "epilog": TASKS_FILE_EPILOG}  # parse errors raise, and become one line
    return TrainingCLI(
        L.LightningModule,
        ResumableTaskDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False, "epilog": TASKS_FILE_EPILOG,
                       **{s: dict(sub_kwargs) for s in ([only] if only else LightningCLI.subcommands())}},
        args=argv,
        only_subcommand=only,
    )


def cli_main(argv=None) -> int:
    """``python train.py ...``: 0; 2 with one line ``train.py: error: ...``; 143 when stopped by SIGTERM; 130 with one
    line ``train.py: interrupted; ...`` (the checkpoint kept, how to resume) on Ctrl-C."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    def body() -> int:
        try:
            main(argv)
        except SIGTERMException:  # SLURM requeue or scancel: the checkpoints stay for the resumed run
            print(f"{PROG}: stopped by SIGTERM; resume with --ckpt_path last (a requeued SLURM job does)", file=sys.stderr)
            return 143
        return 0

    return run_cli(PROG, body, format_error=_format_error)
