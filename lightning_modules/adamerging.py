"""AdaMerging (Yang et al., ICLR 2024): learn merge coefficients by test-time entropy minimisation.

    θ(λ) = θ_pre + Σ_t λ_t τ_t            task-wise, λ (n_tasks,)
    θ(λ)_l = θ_pre,l + Σ_t λ_{t,l} τ_t,l   layer-wise, λ (n_tasks, n_float_tensors), one per float tensor

λ starts at ``init`` (0.3), is the only parameter, and is clamped to [0, 1] after every optimiser
step. Loss = Σ_t mean_batch H(softmax(normalize(f_θ(λ)(x_t)) @ H_tᵀ)) on unlabeled dev images x_t of
every task t, with the frozen zero-shot heads H_t (docs/design.md §9: Adam lr 1e-3, 500 steps, batch 16 per
task). θ_pre and τ_t are plain tensors (not parameters, not buffers): the encoder runs with
``torch.func.functional_call`` on θ(λ), so gradients reach λ only, DDP sees one always-used parameter,
and neither DDP buffer broadcasts nor checkpoints carry n + 1 copies of the model.
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch.func import functional_call
from torch.utils.data import DataLoader

from datamodules.datamodule import TaskDataModule
from datamodules.tasks import get_task
from merging.io import MergeInputError, load_metadata, load_state_dict
from merging.task_vectors import task_vector
from modeling.clip import EMBEDDED_MODEL, load_base_model, zero_shot_head

__all__ = ["AdaMerging", "MultiTaskUnlabeledDataModule", "prediction_entropy"]


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of H(p) = −Σ_c p_c log p_c, p = softmax(logits (B, C)); computed in float32."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean()


class AdaMerging(L.LightningModule):
    """Task- or layer-wise AdaMerging of exported fine-tuned image encoders.

    Args:
        model_name / pretrained: the base model θ_pre (``modeling.clip.load_base_model``).
        models: exported fine-tuned encoders (.safetensors with a metadata sidecar).
        tasks: the task of each model; ``None`` reads ``task`` from each model's metadata.
        granularity: ``"task"`` (one λ per task) or ``"layer"`` (one λ per task and float tensor).
        init: initial λ. lr: Adam learning rate.
        cache_dir: where zero-shot heads are cached.
    """

    def __init__(
        self,
        model_name: str = EMBEDDED_MODEL,
        pretrained: str | None = None,
        models: list[str] = [],  # noqa: B006 - LightningCLI needs a typed default; never mutated
        tasks: list[str] | None = None,
        granularity: Literal["task", "layer"] = "task",
        init: float = 0.3,
        lr: float = 1e-3,
        cache_dir: str = ".cache/badmerging",
    ):
        super().__init__()
        self.save_hyperparameters()
        models = [str(m) for m in models]
        if not models:
            raise ValueError("AdaMerging: no fine-tuned models given; pass --model.models [a.safetensors, ...]")
        if granularity not in ("task", "layer"):
            raise ValueError(f"AdaMerging: granularity={granularity!r} must be 'task' or 'layer'")
        if tasks is not None and len(tasks) != len(models):
            raise ValueError(f"AdaMerging: {len(tasks)} tasks for {len(models)} models; give one task per model "
                             "or leave --model.tasks unset to read them from the models' metadata")
        base = load_base_model(model_name, pretrained)
        self.base_description = base.describe()
        theta_pre = base.encoder_state_dict()

        self.task_names: list[str] = []
        vectors = []
        for index, path in enumerate(models):
            meta = load_metadata(path) or {}
            task = tasks[index] if tasks is not None else meta.get("task")
            if not task:
                raise ValueError(f"{path}: no 'task' in its metadata sidecar; pass --model.tasks")
            base_id = (meta.get("base_model") or {}).get("base_id")
            if base_id is not None and base_id != base.base_id:
                raise MergeInputError(f"{path} was fine-tuned from {base_id}, not {base.base_id}; pass the matching "
                                      "--model.model_name / --model.pretrained")
            try:
                vectors.append(task_vector(load_state_dict(path), theta_pre))
            except MergeInputError as error:
                raise MergeInputError(f"{path}: {error}") from None
            self.task_names.append(get_task(task).name)
        if len(set(self.task_names)) != len(self.task_names):
            raise ValueError(f"AdaMerging: tasks {self.task_names} repeat; the loss takes one model per task")

        #: float keys merged, in the order of the layer-wise λ columns
        self.merge_keys: list[str] = sorted(vectors[0])
        # Plain tensors, moved lazily to λ's device (see the module docstring for why not buffers).
        self._pretrained = theta_pre
        self._tau = {k: torch.stack([v[k] for v in vectors]) for k in self.merge_keys}  # (n_tasks, *shape)
        del vectors
        shape = (len(models),) if granularity == "task" else (len(models), len(self.merge_keys))
        self.lambdas = nn.Parameter(torch.full(shape, float(init)).clamp(0.0, 1.0))
        for index, task in enumerate(self.task_names):  # (C, D), small: buffers follow the module's device
            self.register_buffer(f"head_{index}", zero_shot_head(base, get_task(task), cache_dir), persistent=False)
        # Not a submodule: its own weights are never used (functional_call swaps in θ(λ)), and keeping it
        # out of the module tree keeps it out of the optimiser, DDP and checkpoints. Eval: no dropout.
        self._encoder = [base.model.visual.eval().requires_grad_(False)]
        self._frozen_device = torch.device("cpu")

    # -- merged weights ----------------------------------------------------------------------------
    @property
    def encoder(self) -> nn.Module:
        return self._encoder[0]

    def _frozen_to(self, device: torch.device) -> None:
        if device != self._frozen_device:
            self._pretrained = {k: v.to(device) for k, v in self._pretrained.items()}
            self._tau = {k: v.to(device) for k, v in self._tau.items()}
            self.encoder.to(device)
            self._frozen_device = device

    def merged_parameters(self, lambdas: torch.Tensor) -> dict[str, torch.Tensor]:
        """θ(λ) on the merged keys, differentiable in ``lambdas`` (n_tasks,) or (n_tasks, n_keys)."""
        self._frozen_to(lambdas.device)
        theta = {}
        for column, key in enumerate(self.merge_keys):
            tau = self._tau[key]
            coefficients = lambdas if lambdas.dim() == 1 else lambdas[:, column]
            pre = self._pretrained[key]
            theta[key] = (pre.to(tau.dtype) + torch.tensordot(coefficients.to(tau.dtype), tau, dims=1)).to(pre.dtype)
        return theta

    def clamped_lambdas(self) -> torch.Tensor:
        return self.lambdas.detach().clamp(0.0, 1.0)

    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """θ(clamp(λ)) as a full encoder state dict (non-float tensors from θ_pre), detached, on CPU."""
        theta = self.merged_parameters(self.clamped_lambdas())
        return {k: (theta[k] if k in theta else v).detach().cpu().clone() for k, v in self._pretrained.items()}

    def coefficients(self) -> list:
        """clamp(λ) as nested lists: [λ_t] task-wise, [[λ_t,l for l in merge_keys] for t] layer-wise."""
        return self.clamped_lambdas().cpu().tolist()

    def export_metadata(self) -> dict:
        """What made the merged weights; callers add seed and code version."""
        h = self.hparams
        return {"kind": "merge", "method": "adamerging", "granularity": h.granularity, "tasks": list(self.task_names),
                "models": [str(m) for m in h.models], "coefficients": self.coefficients(),
                "coefficient_keys": list(self.merge_keys) if h.granularity == "layer" else None,
                "recipe": {"init": h.init, "lr": h.lr, "global_step": int(self.global_step)},
                "base_model": self.base_description}

    # -- training -----------------------------------------------------------------------------------
    def head(self, index: int) -> torch.Tensor:
        return getattr(self, f"head_{index}")

    def forward(self, images: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Logits (B_t, C_t) of θ(λ) per task for ``images`` {task: (B_t, 3, S, S)}, one encoder pass."""
        theta = self.merged_parameters(self.lambdas)
        names = [t for t in self.task_names if t in images]
        xs = [images[t] for t in names]
        features = functional_call(self.encoder, theta, (torch.cat(xs),))
        logits = {}
        for task, f in zip(names, features.split([len(x) for x in xs])):
            head = self.head(self.task_names.index(task))
            logits[task] = F.normalize(f, dim=-1) @ head.to(f.dtype).T
        return logits

    def _images(self, batch) -> dict[str, torch.Tensor]:
        if not isinstance(batch, dict):
            raise TypeError(f"AdaMerging expects batches {{task: images}}, got {type(batch).__name__}; "
                            "use MultiTaskUnlabeledDataModule")
        missing = [t for t in self.task_names if t not in batch]
        if missing:
            raise ValueError(f"batch lacks task {missing[0]!r} (has {sorted(batch)}); "
                             "give the data module the model's tasks")
        # labels, if the loader yields (x, y), are ignored: AdaMerging is unsupervised
        return {t: batch[t][0] if isinstance(batch[t], (tuple, list)) else batch[t] for t in self.task_names}

    def training_step(self, batch, batch_idx):
        images = self._images(batch)
        logits = self(images)
        entropies = {t: prediction_entropy(logits[t]) for t in self.task_names}
        loss = torch.stack(list(entropies.values())).sum()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite entropy {loss.item()} at step {self.global_step}; check the inputs")
        size = sum(len(x) for x in images.values())
        self.log("adamerging/entropy", loss, prog_bar=True, batch_size=size)
        for task, value in entropies.items():
            self.log(f"adamerging/entropy_{task}", value, batch_size=size)
        self.log("adamerging/lambda_mean", self.lambdas.detach().mean(), batch_size=size)
        return loss

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        with torch.no_grad():  # projected gradient descent onto [0, 1]
            self.lambdas.clamp_(0.0, 1.0)

    def configure_optimizers(self):
        return torch.optim.Adam([self.lambdas], lr=self.hparams.lr)


class MultiTaskUnlabeledDataModule(L.LightningDataModule):
    """Shuffled batches {task: (images (B, 3, S, S), labels)} from one split of every task.

    Each task's data comes from a ``TaskDataModule``; ``split`` "val" is the held-out part of train
    (docs/design.md §6), "test" the transductive setting of the AdaMerging paper. Loaders are combined with
    ``CombinedLoader(mode="max_size_cycle")``: shorter tasks cycle so every step sees every task.
    Under DDP, Lightning gives each loader a DistributedSampler.
    """

    def __init__(
        self,
        tasks: list[str],
        model_name: str = EMBEDDED_MODEL,
        cache_dir: str = ".cache/badmerging",
        batch_size: int = 16,
        split: Literal["train", "val", "test"] = "val",
        num_workers: int = 0,
        synthetic_train_size: int = 40000,
        synthetic_test_size: int = 1000,
        data_dirs: dict[str, str] | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        if not tasks:
            raise ValueError("MultiTaskUnlabeledDataModule: no tasks given; pass --data.tasks [shapes, ...]")
        self.tasks = [get_task(t).name for t in tasks]
        self.modules = {
            t: TaskDataModule(task=t, data_dir=(data_dirs or {}).get(t), model_name=model_name, batch_size=batch_size,
                              num_workers=num_workers, cache_dir=cache_dir, synthetic_train_size=synthetic_train_size,
                              synthetic_test_size=synthetic_test_size, seed=seed)
            for t in self.tasks
        }

    def prepare_data(self) -> None:
        for dm in self.modules.values():
            dm.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        for dm in self.modules.values():
            dm.setup(stage)

    def train_dataloader(self) -> CombinedLoader:
        h = self.hparams
        loaders = {}
        for index, (task, dm) in enumerate(self.modules.items()):
            dataset = dm.dataset(h.split)
            loaders[task] = DataLoader(
                dataset, batch_size=h.batch_size, shuffle=True,
                drop_last=len(dataset) >= h.batch_size,  # equal batch sizes, unless the split is tiny
                num_workers=h.num_workers, persistent_workers=h.num_workers > 0,
                pin_memory=torch.cuda.is_available(),
                generator=torch.Generator().manual_seed(h.seed + index),
            )
        return CombinedLoader(loaders, mode="max_size_cycle")
