"""TensorBoard: each run's hyperparameters (HPARAMS tab) and trigger images, plus helpers to log
figures and scalars from outside a Trainer (pipeline plots, Backdoor-Vector heat-maps such as
``log_figure(out_dir / "tensorboard", "bv/cosine", evaluation.figures.matrix_heatmap(...))``).

    trainer:
      logger:
        class_path: lightning.pytorch.loggers.TensorBoardLogger
        init_args: {save_dir: outputs/finetune, name: embedded}
      callbacks:
        - class_path: callbacks.tensorboard.TensorBoardHparamsAndImages

``TensorBoardHparamsAndImages`` writes, for every TensorBoardLogger of the trainer (rank 0 only):

- at fit start, one hparams *session* for the run (``run_hparams``: the module's hyperparameters,
  the datamodule's as ``data.<name>``, the module class, the step budget, the seed). TensorBoard's
  HPARAMS tab pairs every session with the *last* value of each scalar of its run, so once fit ends its
  ``val/acc``, ``val/asr``, ... columns hold the final metrics; at train end the session is marked
  done (``on_exception``: failed). No experiment summary is written: TensorBoard then builds the table
  from every session under ``--logdir``, so fine-tunes, triggers and attacks with different
  hyperparameters compare in one table (one run's experiment summary would hide the others' columns);
- at fit start, for modules with a fixed trigger (``trigger_tensor`` + ``trigger_spec``, e.g.
  ``BackdoorInjection``), ``trigger/patch`` (or ``trigger/pattern`` for a blended trigger) and
  ``trigger/samples``, a grid of triggered validation images, un-normalised (CLIP mean/std undone) and
  scaled up with nearest-neighbour to at least ``min_side`` px. Stage 1 (``UniversalTrigger``) logs its
  optimised patch itself at train end under the same tags.

Nothing runs per step. Lightning's placeholder ``hp_metric`` session is switched off for the run:
TensorBoard keeps the first session written to a run, which would otherwise be Lightning's.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
import torch.nn.functional as F

__all__ = ["TensorBoardHparamsAndImages", "log_figure", "log_scalars", "run_hparams", "trigger_images"]


# -- helpers usable without a Trainer -------------------------------------------------------------

@contextmanager
def _writer(target):
    """A SummaryWriter for ``target``: a log directory (opened and closed here), a SummaryWriter, or a
    Lightning TensorBoardLogger (its ``experiment``)."""
    from torch.utils.tensorboard import SummaryWriter

    if isinstance(target, (str, Path)):
        writer = SummaryWriter(str(target))
        try:
            yield writer
        finally:
            writer.close()
        return
    yield target.experiment if hasattr(target, "experiment") else target


def log_figure(target, tag: str, figure, step: int = 0, close: bool = True) -> None:
    """Log a matplotlib ``figure`` under ``tag`` (TensorBoard's IMAGES tab) to ``target`` (log dir,
    SummaryWriter or TensorBoardLogger); ``close`` closes the figure afterwards."""
    import matplotlib.pyplot as plt

    with _writer(target) as writer:
        writer.add_figure(tag, figure, global_step=step, close=False)
    if close:
        plt.close(figure)


def log_scalars(target, scalars: Mapping[str, float], step: int = 0) -> None:
    """Log each ``{tag: value}`` as a scalar at ``step`` to ``target`` (log dir, SummaryWriter or logger)."""
    with _writer(target) as writer:
        for tag, value in scalars.items():
            writer.add_scalar(tag, float(value), global_step=step)


def _zoom(images: torch.Tensor, min_side: int) -> torch.Tensor:
    """Nearest-neighbour upscaling by the integer factor that brings the side to ≥ ``min_side`` px."""
    factor = max(1, min_side // images.shape[-1])
    return F.interpolate(images, scale_factor=factor, mode="nearest") if factor > 1 else images


def trigger_images(trigger: torch.Tensor, triggered: torch.Tensor | None, mean: Sequence[float],
                   std: Sequence[float], min_side: int = 96, nrow: int = 4) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(trigger image (3, H, W), grid of triggered samples (3, H', W') or None), pixels in [0, 1].

    ``trigger`` (3, h, w) and ``triggered`` (B, 3, S, S) are CLIP-normalised; mean/std are undone
    (``datamodules.triggers.unnormalise``) and both are upscaled to at least ``min_side`` px.
    """
    from torchvision.utils import make_grid

    from datamodules.triggers import unnormalise

    image = _zoom(unnormalise(trigger, mean, std)[None], min_side)[0]
    if triggered is None or not len(triggered):
        return image, None
    pixels = torch.stack([unnormalise(x, mean, std) for x in triggered])
    return image, make_grid(_zoom(pixels, min_side), nrow=nrow)


def _hparam_value(value: Any):
    """A value the HPARAMS tab shows: bool / number / string (None → "None", containers → short JSON)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if value is None:
        return "None"
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    try:
        text = json.dumps(value, default=str)
    except (TypeError, ValueError):
        text = str(value)
    return text if len(text) <= 120 else f"{text[:100]}… ({len(text)} chars)"


def _flatten(params: Mapping, prefix: str = "") -> dict:
    out = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = _hparam_value(value)
    return out


# Datamodule arguments that train.py links to the module's (the same value twice adds nothing).
_LINKED = ("task", "model_name", "cache_dir")


def _public(params) -> dict:
    # LightningCLI adds ``_class_path`` / ``_instantiator`` to saved hyperparameters: not the user's.
    return {k: v for k, v in dict(params or {}).items() if not str(k).startswith("_")}


def run_hparams(trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
    """The hyperparameters a run's HPARAMS entry shows: ``model`` (class), the module's own (nested dicts
    flattened with "."), the datamodule's as ``data.<name>`` (minus those linked to the module's), the
    trainer's ``trainer.max_steps`` / ``max_epochs`` / ``precision`` / ``world_size`` and ``seed_everything``."""
    params = {"model": type(pl_module).__name__, **_flatten(_public(pl_module.hparams))}
    datamodule = getattr(trainer, "datamodule", None)
    for key, value in _flatten(_public(getattr(datamodule, "hparams", None))).items():
        if not (key in _LINKED and params.get(key) == value):
            params[f"data.{key}"] = value
    params.update({"trainer.max_steps": trainer.max_steps, "trainer.max_epochs": _hparam_value(trainer.max_epochs),
                   "trainer.precision": str(trainer.precision), "trainer.world_size": trainer.world_size,
                   "seed_everything": int(os.environ.get("PL_GLOBAL_SEED", -1))})
    return params


def _hparams_summary(tag: str, plugin_data):
    """A Summary holding hparams plugin data (what ``tensorboard.plugins.hparams.summary`` builds, without TensorFlow)."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import metadata

    return Summary(value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(plugin_data),
                                        tensor=metadata.NULL_TENSOR)])


def session_start_summary(hparams: Mapping[str, Any]):
    """The SessionStartInfo summary of one run (its HPARAMS row)."""
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    info = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for name, value in hparams.items():
        value = _hparam_value(value)
        if isinstance(value, bool):
            info.hparams[name].bool_value = value
        elif isinstance(value, (int, float)):
            info.hparams[name].number_value = value
        else:
            info.hparams[name].string_value = value
    return _hparams_summary(metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(
        version=metadata.PLUGIN_DATA_VERSION, session_start_info=info))


def session_end_summary(success: bool):
    """The SessionEndInfo summary: the run's status (success / failure) and end time."""
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    status = api_pb2.STATUS_SUCCESS if success else api_pb2.STATUS_FAILURE
    info = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time())
    return _hparams_summary(metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(
        version=metadata.PLUGIN_DATA_VERSION, session_end_info=info))


# -- the callback ------------------------------------------------------------------------------------

class TensorBoardHparamsAndImages(L.Callback):
    """Hparams session per run (final metrics = last scalars) and, for fixed-trigger attacks, the trigger
    and triggered validation samples, un-normalised (see the module docstring).

    Args:
        num_samples: triggered validation images in the grid (0: the trigger only).
        nrow: images per grid row.
        min_side: images are scaled up (nearest) to at least this many pixels per side.
    """

    def __init__(self, num_samples: int = 8, nrow: int = 4, min_side: int = 96):
        super().__init__()
        if num_samples < 0 or nrow < 1 or min_side < 1:
            raise ValueError(f"num_samples={num_samples} must be ≥ 0, nrow={nrow} and min_side={min_side} ≥ 1")
        self.num_samples, self.nrow, self.min_side = num_samples, nrow, min_side
        self.hparams_logged: dict | None = None

    @staticmethod
    def _loggers(trainer: L.Trainer) -> list:
        from lightning.pytorch.loggers import TensorBoardLogger

        return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)] if trainer.is_global_zero else []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for logger in self._loggers(trainer):
            logger._default_hp_metric = False  # its hp_metric session would be the run's first, hiding ours

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loggers = self._loggers(trainer)
        if not loggers:
            return
        self.hparams_logged = run_hparams(trainer, pl_module)
        start = session_start_summary(self.hparams_logged)
        for logger in loggers:
            logger.experiment._get_file_writer().add_summary(start)
        self._log_trigger(trainer, pl_module, loggers)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end(trainer, success=True)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._end(trainer, success=False)

    def _end(self, trainer: L.Trainer, success: bool) -> None:
        if self.hparams_logged is None:
            return
        for logger in self._loggers(trainer):
            writer = logger.experiment._get_file_writer()
            writer.add_summary(session_end_summary(success))
            writer.flush()
        self.hparams_logged = None

    @torch.no_grad()
    def _log_trigger(self, trainer: L.Trainer, pl_module: L.LightningModule, loggers: list) -> None:
        trigger, spec = getattr(pl_module, "trigger_tensor", None), getattr(pl_module, "trigger_spec", None)
        if trigger is None or spec is None or not hasattr(pl_module, "add_trigger"):
            return
        triggered = None
        samples = self._val_samples(trainer)
        if samples is not None:
            triggered = pl_module.add_trigger(samples.to(trigger.device, trigger.dtype)).cpu()
        image, grid = trigger_images(trigger, triggered, pl_module.mean, pl_module.std, self.min_side, self.nrow)
        tag = "trigger/patch" if spec.kind == "patch" else "trigger/pattern"
        for logger in loggers:
            logger.experiment.add_image(tag, image, trainer.global_step)
            if grid is not None:
                logger.experiment.add_image("trigger/samples", grid, trainer.global_step)

    def _val_samples(self, trainer: L.Trainer) -> torch.Tensor | None:
        """The first ``num_samples`` validation images (normalised), read from the dataset by index: no
        DataLoader iterator, so the global RNG (hence the training data order) is untouched."""
        datamodule = getattr(trainer, "datamodule", None)
        if not self.num_samples or datamodule is None:
            return None
        with torch.random.fork_rng(devices=[]):
            dataset = datamodule.val_dataloader().dataset
            n = min(self.num_samples, len(dataset))
            return torch.stack([torch.as_tensor(dataset[i][0]) for i in range(n)]) if n else None
