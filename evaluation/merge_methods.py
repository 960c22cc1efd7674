"""Merge methods as components: one class per method, registered by name (FusionBench style).

A method turns θ_pre and n fine-tuned image encoders into one state dict. Weight-only methods (Task
Arithmetic, TIES, ...) wrap the pure functions of ``merging.methods``; data-dependent ones (RegMean,
AdaMerging) read task data through the same ``MergeContext``, so callers treat every method alike:

    method = resolve_merge_method("ties")               # or "my_module.MyMethod", or {class_path: ..., init_args: ...}
    hp = {**method.defaults(), "coefficient": 0.3}
    method.validate(hp, n_models=4, where="ties")       # cheap, before any work
    merged = method.merge(context, **hp)                # {key: tensor}, θ_pre's keys and dtypes

A new method is a ``MergeMethod`` subclass in any importable file, named in a config by its import path.
"""

from __future__ import annotations

import abc
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from evaluation.registry import Registry, canonical_name
from merging.io import MergeInputError, load_state_dict
from merging.methods import build_plan, get_merge_method, method_hyperparameters
from merging.streaming import merge_files
from merging.task_vectors import not_finite_in
from modeling.clip import BaseModel

__all__ = ["DATA_METHODS", "REGISTRY", "AdaMergingMethod", "MergeContext", "MergeMethod", "RegMeanMethod", "WeightMethod",
           "check_finite", "check_positive_int", "check_scaling_hyperparameters", "register_merge_method",
           "resolve_merge_method"]

StateDict = dict[str, torch.Tensor]

#: the merges DARE's rescaled task vectors can go into (``merging.methods.dare``'s ``base``)
DARE_BASES = ("task_arithmetic", "ties")


def check_positive_int(where: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MergeInputError(f"{where}={value!r} must be a positive integer")


def check_finite(where: str, name: str, value, dtype: torch.dtype | None = None) -> float:
    """``value`` as a float, refused unless finite, and (``dtype``) finite in ``dtype`` too, the dtype of the
    weights it scales: 1e39 is finite as a float64 but inf as float32 and would turn the merge into NaN."""
    try:
        number = float(value)
    except OverflowError:  # an int beyond float64
        number = math.inf
    except (TypeError, ValueError):
        raise MergeInputError(f"{where}: {name}={value!r} must be a number") from None
    if not math.isfinite(number):
        raise MergeInputError(f"{where}: {name}={value!r} must be finite")
    reason = None if dtype is None else not_finite_in(number, dtype)
    if reason:
        hint = "a merge coefficient such as 0.3" if name == "coefficient" else f"a smaller {name}"
        raise MergeInputError(f"{where}: {name}={value!r} {reason}, the dtype of the weights it scales; use {hint}")
    return number


def check_scaling_hyperparameters(method: "MergeMethod", hparams: dict, where: str, dtype: torch.dtype) -> None:
    """Every hyperparameter that multiplies weights (``method.scaling_hyperparameters``; a number or one per task)
    finite in ``dtype``, the dtype of the weights it scales (float32 / float16 / bfloat16 / ...)."""
    for key in method.scaling_hyperparameters:
        value = hparams.get(key)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                check_finite(where, key, v, dtype)


@dataclass
class MergeContext:
    """What a merge may use: θ_pre, the models (files and, in memory, τ_t = θ_t − θ_pre), their tasks, data settings."""

    base: BaseModel
    theta_pre: StateDict
    model_paths: list[str]
    tasks: list[str]
    metas: list[dict | None] = field(default_factory=list)  # each model's metadata (sidecar or header)
    vectors: list[StateDict] | None = None  # None under the streaming engine (read tensor by tensor from the files)
    pretrained_path: Path | None = None     # θ_pre as a file, for the streaming engine
    model_name: str = ""
    pretrained: str | None = None
    cache_dir: str = ".cache/badmerging"
    data_dirs: dict[str, str] = field(default_factory=dict)
    synthetic_train_size: int = 40000
    synthetic_test_size: int = 1000
    gram_batch_size: int = 128
    merge_threads: int | None = None

    @property
    def streaming(self) -> bool:
        return self.vectors is None

    def datamodule(self, task: str, batch_size: int, stage: str = "fit"):
        """A set-up TaskDataModule of ``task`` with the run's data settings (train / val / test splits)."""
        from datamodules.datamodule import TaskDataModule

        dm = TaskDataModule(task=task, data_dir=self.data_dirs.get(task), model_name=self.base.name,
                            cache_dir=self.cache_dir, batch_size=batch_size, synthetic_train_size=self.synthetic_train_size,
                            synthetic_test_size=self.synthetic_test_size)
        dm.prepare_data()
        dm.setup(stage)
        return dm


class MergeMethod(abc.ABC):
    """A merge method: ``name``, default ``hyperparameters`` ("coefficient" among them: the plan's λ values set it),
    ``validate`` (cheap, before any work) and ``merge``.

    ``records_defaults``: rows record defaults + given hyperparameters (False: only the given ones).
    ``learned``: what the last ``merge`` learned (e.g. AdaMerging's λ), recorded in the row's hyperparameters.
    ``scaling_hyperparameters``: those that multiply weights, checked finite in the weights' dtype before any work.
    """

    name: ClassVar[str]
    needs_data: ClassVar[bool] = False
    hyperparameters: ClassVar[dict[str, Any]] = {}
    records_defaults: ClassVar[bool] = True
    scaling_hyperparameters: ClassVar[tuple[str, ...]] = ("coefficient",)
    learned: dict[str, Any] = {}  # a merge that learns something assigns a new dict (never mutate this default)

    def defaults(self) -> dict[str, Any]:
        return dict(self.hyperparameters)

    @property
    def takes_coefficient(self) -> bool:
        return "coefficient" in self.defaults()

    def validate(self, hparams: dict, n_models: int, where: str) -> None:
        """Refuse unknown or bad hyperparameters (``hparams`` = defaults + given) in one line naming ``where``."""
        known = set(self.defaults())
        unknown = sorted(set(map(str, hparams)) - known)
        if unknown:
            raise MergeInputError(f"{where}: unknown hyperparameter(s) {unknown}; {self.name} takes {sorted(known)}")

    @abc.abstractmethod
    def merge(self, context: MergeContext, **hparams) -> StateDict:
        """The merged state dict: θ_pre's keys, shapes and dtypes, on CPU."""


REGISTRY: Registry[MergeMethod] = Registry("merge method", MergeMethod, "my_module.MyMethod")
register_merge_method = REGISTRY.register


def resolve_merge_method(spec, flag: str | None = None) -> MergeMethod:
    """A fresh instance of the method ``spec`` names (registered name, import path or {class_path, init_args})."""
    return REGISTRY.resolve(spec, flag=flag)


# -- weight-only methods: the pure functions of merging.methods, in memory or streamed from the files --
class WeightMethod(MergeMethod):
    """A method of ``merging.methods`` (``name`` is its registered name there); defaults read from its signature."""

    allows_negative_coefficient: ClassVar[bool] = False

    def defaults(self) -> dict[str, Any]:
        return method_hyperparameters(self.name)

    def validate(self, hparams: dict, n_models: int, where: str) -> None:
        if self.name == "dare" and "base" in hparams and canonical_name(hparams["base"]) not in DARE_BASES:
            # merging.methods would call it an unknown merge method and list only its own weight methods
            raise MergeInputError(f"{where}: base={hparams['base']!r} must be one of {', '.join(DARE_BASES)} (the weight "
                                  "merge DARE's rescaled task vectors go into)")
        if "k" in hparams and (self.name == "ties" or str(hparams.get("base", "")).lower() == "ties"):
            if not 0 < check_finite(where, "k", hparams["k"]) <= 100:
                raise MergeInputError(f"{where}: k={hparams['k']!r} must lie in (0, 100] (percent of each task vector "
                                      "kept); TIES uses 20")
        build_plan(self.name, n_models, **hparams)  # names the bad or unknown hyperparameter
        lam = hparams.get("coefficient")
        if not self.allows_negative_coefficient and isinstance(lam, (int, float)) and lam < 0:
            raise MergeInputError(f"{where}: coefficient={lam!r} is negative, which is meaningless for {self.name} (it "
                                  "flips the merged vector); use a coefficient > 0, or task_arithmetic with λ < 0 for negation")

    def merge(self, context: MergeContext, **hparams) -> StateDict:
        if context.streaming:
            return merge_files(context.pretrained_path, context.model_paths, self.name, progress=False,
                               num_threads=context.merge_threads, **hparams)
        return get_merge_method(self.name)(context.theta_pre, context.vectors, **hparams)


@register_merge_method
class TaskArithmetic(WeightMethod):
    """θ_pre + λ·Σ_t τ_t; λ < 0 negates the tasks (task negation)."""

    name = "task_arithmetic"
    allows_negative_coefficient = True


@register_merge_method
class WeightAverage(WeightMethod):
    """The mean of the fine-tuned models: Task Arithmetic with λ = 1/n."""

    name = "weight_average"


@register_merge_method
class Ties(WeightMethod):
    """TIES: per task keep the top-k% of |τ_t|, elect signs, disjoint sum or mean; θ_pre + λ·merged."""

    name = "ties"


@register_merge_method
class Dare(WeightMethod):
    """DARE: drop τ entries with probability p, rescale by 1/(1 − p), then Task Arithmetic or TIES."""

    name = "dare"


@register_merge_method
class Breadcrumbs(WeightMethod):
    """Model Breadcrumbs: keep the middle band of |τ_t| per tensor, then Task Arithmetic."""

    name = "breadcrumbs"


@register_merge_method
class Consensus(WeightMethod):
    """Consensus (TALL masks): keep entries active in ≥ k task masks, then Task Arithmetic."""

    name = "consensus"
    scaling_hyperparameters = ("coefficient", "lam")  # lam scales |τ_MTL − τ_t| in the TALL mask


# -- data-dependent methods --
def _check_unit_interval(where: str, hparams: dict, key: str, meaning: str) -> None:
    if key in hparams and not 0 <= check_finite(where, key, hparams[key]) <= 1:
        raise MergeInputError(f"{where}: {key}={hparams[key]!r} must lie in [0, 1] ({meaning})")


@register_merge_method
class RegMeanMethod(MergeMethod):
    """RegMean: per linear layer W = (Σ G_t)⁻¹ Σ G_t W_t, Gram matrices G_t of its inputs from ``gram_batches``
    train batches of each model's own task (off-diagonal scaled by ``alpha``); other tensors averaged."""

    name = "regmean"
    needs_data = True
    hyperparameters = {"alpha": 0.1, "coefficient_other": "average", "gram_batches": 4}
    records_defaults = False

    def validate(self, hparams: dict, n_models: int, where: str) -> None:
        super().validate(hparams, n_models, where)
        if "gram_batches" in hparams:
            check_positive_int(f"{where}: gram_batches", hparams["gram_batches"])
        _check_unit_interval(where, hparams, "alpha", "off-diagonal scale of the Grams")

    def merge(self, context: MergeContext, **hparams) -> StateDict:
        from merging.regmean import linear_input_grams, regmean_merge

        n_batches = int(hparams.pop("gram_batches"))
        encoder = context.base.model.visual
        finetuned, grams = [], []
        for path, task in zip(context.model_paths, context.tasks):
            loader = context.datamodule(task, context.gram_batch_size).train_dataloader()
            state = load_state_dict(path)
            encoder.load_state_dict(state)
            grams.append(linear_input_grams(encoder, [x for _i, (x, _y) in zip(range(n_batches), loader)]))
            finetuned.append(state)
        encoder.load_state_dict(context.theta_pre)
        return regmean_merge(context.theta_pre, finetuned, grams, **hparams)


@register_merge_method
class AdaMergingMethod(MergeMethod):
    """AdaMerging: λ per task (``granularity: task``) or per task and tensor (``layer``), init ``init``, clamped to
    [0, 1], learned by Adam (``lr``, ``steps``) minimising prediction entropy on unlabeled val batches (16 per task)."""

    name = "adamerging"
    needs_data = True
    hyperparameters = {"granularity": "task", "init": 0.3, "lr": 1e-3, "steps": 500}
    records_defaults = False

    def validate(self, hparams: dict, n_models: int, where: str) -> None:
        super().validate(hparams, n_models, where)
        if "steps" in hparams:
            check_positive_int(f"{where}: steps", hparams["steps"])
        _check_unit_interval(where, hparams, "init", "λ is clamped there")
        if "lr" in hparams and not check_finite(where, "lr", hparams["lr"]) > 0:
            raise MergeInputError(f"{where}: lr={hparams['lr']!r} must be > 0")
        if "granularity" in hparams and hparams["granularity"] not in ("task", "layer"):
            raise MergeInputError(f"{where}: granularity={hparams['granularity']!r} must be 'task' or 'layer'")

    def merge(self, context: MergeContext, **hparams) -> StateDict:
        import lightning as L

        from lightning_modules.adamerging import AdaMerging, MultiTaskUnlabeledDataModule

        steps = int(hparams.pop("steps"))
        module = AdaMerging(model_name=context.model_name, pretrained=context.pretrained, models=list(context.model_paths),
                            tasks=list(context.tasks), cache_dir=context.cache_dir, **hparams)
        dm = MultiTaskUnlabeledDataModule(tasks=list(dict.fromkeys(context.tasks)), model_name=context.model_name,
                                          cache_dir=context.cache_dir, batch_size=16, split="val",
                                          data_dirs=context.data_dirs,
                                          synthetic_train_size=context.synthetic_train_size,
                                          synthetic_test_size=context.synthetic_test_size)
        trainer = L.Trainer(max_steps=steps, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=not os.environ.get("CI"), enable_model_summary=False)
        trainer.fit(module, datamodule=dm)
        self.learned = {"learned_coefficients": module.coefficients()}
        return {k: v.cpu() for k, v in module.merged_state_dict().items()}


#: the registered methods that need data, not only weights
DATA_METHODS = tuple(n for n in REGISTRY.names() if REGISTRY.resolve(n).needs_data)
