"""Backdoor injection: one training loop for BadMerging stage 2 and the poisoning baselines (DESIGN §8).

Per step on a batch (x (B, 3, S, S), y (B,)), with n = ⌊poison_fraction·B⌋ and x_bd = trigger(x[:n]):

    L_clean = CE(H_task(f_θ(x)), y)                              all B clean images
    badmerging:            L = L_clean + α·FI(f_θ(x_bd), f_pre(x_bd), H, target, r),  r ~ U(r_min, r_max)
    badnets/blended/ut_only: L = L_clean + α·CE(H(f_θ(x_bd)), target)               (no interpolation)

H is the task head (on-task, target = ``target_class``) or a shadow head built from
``off_task_classnames`` with the task's templates (off-task, target = index 0). Attacks differ only
in the trigger: badnets a fixed random patch (``TriggerSpec.seed``), blended a fixed random pattern,
ut_only and badmerging the optimised stage-1 trigger from ``trigger_path``. ``alpha`` (default 5,
the paper's FI weight) is also the poison-loss weight of the baselines (our choice).

Validation / test log clean ``acc`` as FineTune plus ``asr``, ``ra``, ``clean_to_target`` and their
``*_hits`` / ``*_total`` counts (``lightning_modules.attack_metrics``). Off-task, asr and
clean_to_target are shadow-head rates on this task's own images (a proxy: the real off-task ASR is
measured on the victim task after merging) and ra counts every image.

Optimiser, schedule and clean logging are ``FineTune``'s, so a clean run and a backdoored run with the
same seed see the same batches: r is drawn from its own generator (``poison_seed``), and the triggers
are deterministic, which keeps Backdoor Vectors (θ_bd − θ_clean, DESIGN §10) paired.
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
import torch.nn.functional as F

from datamodules.tasks import TaskSpec, get_task
from datamodules.triggers import TriggerError, TriggerSpec, apply_trigger, init_patch, init_pattern, load_trigger
from lightning_modules.attack_metrics import AttackSuccessRate, CleanToTargetRate, RobustAccuracy
from lightning_modules.finetune import FineTune
from modeling.clip import EMBEDDED_MODEL, load_base_model, zero_shot_head

__all__ = ["ATTACKS", "BackdoorInjection", "feature_interpolation_loss"]

ATTACKS = ("badnets", "blended", "ut_only", "badmerging")
# Which trigger kind each attack injects (ut_only / badmerging take whatever stage 1 saved).
_ATTACK_KIND = {"badnets": "patch", "blended": "blend"}


def feature_interpolation_loss(z_theta_bd: torch.Tensor, z_pre_bd: torch.Tensor, head: torch.Tensor, target: int,
                               r: float | torch.Tensor) -> torch.Tensor:
    """FI loss = CE(normalize(r·z_θ + (1 − r)·z_pre) @ headᵀ, target), mean over the batch.

    z_theta_bd, z_pre_bd (B, D): raw (un-normalised) embeddings of the triggered images by the trained
    and the frozen pre-trained encoder; head (C, D); r scalar. DESIGN §8 interpolates the raw
    embeddings; the logits then go through the same normalize-then-head classifier as every other
    prediction here (``ImageClassifier.logits``), so the loss trains what merged models will compute.
    """
    z = r * z_theta_bd + (1 - r) * z_pre_bd
    logits = F.normalize(z, dim=-1) @ head.to(z.dtype).T
    labels = torch.full((z.shape[0],), target, dtype=torch.long, device=z.device)
    return F.cross_entropy(logits, labels)


class BackdoorInjection(FineTune):
    """Fine-tune f_θ from θ_pre on the task while injecting a backdoor (BadMerging FI or plain poisoning).

    Args (beyond ``FineTune``'s):
        attack: ``badnets`` | ``blended`` | ``ut_only`` | ``badmerging``.
        trigger_path: a trigger file from ``datamodules.triggers.save_trigger`` (stage 1); required for
            ut_only / badmerging; for badnets / blended it replaces the random trigger.
        trigger: ``TriggerSpec`` fields for the random trigger (blended defaults to kind ``blend``);
            with ``trigger_path`` they must agree with the file's spec.
        target_class: target index in the task's classes (on-task). Must stay 0 off-task.
        off_task_classnames: off-task shadow head classes, target name first (index 0).
        poison_fraction: the first ⌊poison_fraction·B⌋ images of each batch are triggered.
        alpha: weight of the backdoor loss (FI for badmerging, poisoned CE otherwise); default 5.
        r_min, r_max: FI interpolation weight r ~ U(r_min, r_max), one per step (badmerging only).
        poison_seed: seed of r's own generator.
        target_task, target_task_class: the victim task and its class that the backdoor aims at, as
            evaluation after merging reads them from the export (on-task: this task and ``target_class``;
            off-task: taken from an off-task stage-1 trigger file, else required).

    Off-task with an off-task stage-1 ``trigger_path``, ``off_task_classnames`` defaults to the file's
    shadow classes, so stage 2 trains against the very head the trigger was optimised for.
    """

    def __init__(
        self,
        task: str = "shapes",
        model_name: str = EMBEDDED_MODEL,
        pretrained: str | None = None,
        lr: float = 1e-5,
        weight_decay: float = 0.1,
        warmup_steps: int = 500,
        cache_dir: str = ".cache/badmerging",
        attack: Literal["badnets", "blended", "ut_only", "badmerging"] = "badmerging",
        trigger_path: str | None = None,
        trigger: dict | None = None,
        target_class: int = 0,
        off_task_classnames: list[str] | None = None,
        poison_fraction: float = 0.5,
        alpha: float = 5.0,
        r_min: float = 0.2,
        r_max: float = 1.0,
        poison_seed: int = 1234,
        target_task: str | None = None,
        target_task_class: int | None = None,
    ):
        # Cheap checks before the model loads, so a bad config fails in a second.
        if attack not in ATTACKS:
            raise ValueError(f"attack={attack!r} is unknown; use one of {', '.join(ATTACKS)}")
        if attack in ("ut_only", "badmerging") and not trigger_path:
            raise TriggerError(f"attack={attack} needs model.trigger_path, the optimised trigger saved by stage 1; "
                               "use attack=badnets for a fixed random patch")
        if not 0.0 < poison_fraction <= 1.0:
            raise ValueError(f"poison_fraction={poison_fraction} must be in (0, 1]; 0.5 triggers half of each batch")
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha={alpha} must be a finite weight ≥ 0 (the paper uses 5)")
        if not 0.0 <= r_min <= r_max <= 1.0:
            raise ValueError(f"r_min={r_min}, r_max={r_max} must satisfy 0 ≤ r_min ≤ r_max ≤ 1 (the paper: 0.2, 1.0)")
        trigger_meta = load_trigger(trigger_path)[2] if trigger_path else {}
        if trigger_meta.get("mode") == "off_task":
            off_task_classnames = off_task_classnames or trigger_meta.get("shadow_classnames")
            target_task = target_task or trigger_meta.get("task")
            target_task_class = trigger_meta.get("target_class") if target_task_class is None else target_task_class
        if off_task_classnames is not None:
            if len(off_task_classnames) < 2:
                raise ValueError("off_task_classnames needs the target name first plus other class names "
                                 "(the paper uses ~300); pass null for an on-task attack")
            if target_class != 0:
                raise ValueError(f"target_class={target_class} must be 0 off-task: the target is "
                                 f"off_task_classnames[0] ({off_task_classnames[0]!r})")
        super().__init__(task, model_name, pretrained, lr, weight_decay, warmup_steps, cache_dir)
        self.save_hyperparameters()

        encoder = self.encoder
        size = encoder.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        # Same rule as modeling.clip.load_base_model (the data pipeline normalises with these).
        import open_clip

        self.mean = tuple(getattr(encoder, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
        self.std = tuple(getattr(encoder, "image_std", None) or open_clip.OPENAI_DATASET_STD)

        tensor, self.trigger_spec = self._resolve_trigger(attack, trigger_path, trigger)
        self.register_buffer("trigger_tensor", tensor, persistent=False)

        # Backdoor head and target.
        self.off_task = off_task_classnames is not None
        if self.off_task:
            shadow = TaskSpec(name=f"{self.spec.name}-shadow", hub_id=None, hub_config=None, train_split="train",
                              test_split="test", classnames=tuple(off_task_classnames), templates=self.spec.templates)
            base = load_base_model(model_name, pretrained)  # FineTune dropped the text tower; needed once
            self.register_buffer("shadow_head", zero_shot_head(base, shadow, cache_dir).clone(), persistent=False)
            self.shadow_classnames = tuple(off_task_classnames)
            del base
            self.target = 0
            self.target_name = off_task_classnames[0]
            if target_task is None or target_task_class is None:
                raise ValueError("an off-task attack needs model.target_task and model.target_task_class (the victim "
                                 "task and its class named off_task_classnames[0]), or an off-task stage-1 trigger_path")
            self.target_task = get_task(target_task).name
            victim = get_task(target_task).classnames
            if not 0 <= target_task_class < len(victim):
                raise ValueError(f"target_task_class={target_task_class} is not a class of task {target_task} "
                                 f"(0..{len(victim) - 1})")
            self.target_task_class = int(target_task_class)
        else:
            n = len(self.spec.classnames)
            if not 0 <= target_class < n:
                raise ValueError(f"target_class={target_class} is not a class of task {self.spec.name} "
                                 f"(0..{n - 1}); pick an index into its class names")
            if target_task not in (None, self.spec.name) or target_task_class not in (None, target_class):
                raise ValueError(f"on-task the target is this task's class target_class={target_class}; drop "
                                 f"target_task={target_task!r}/target_task_class={target_task_class!r} or set off_task_classnames")
            self.shadow_head = None
            self.target = target_class
            self.target_name = self.spec.classnames[target_class]
            self.target_task, self.target_task_class = self.spec.name, int(target_class)

        # f_pre: a frozen copy of θ_pre, kept in a plain dict so it is no submodule: never in the
        # optimiser, the checkpoint, DDP's parameter set, or Lightning's .train() calls.
        self._frozen: dict[str, torch.nn.Module] = {}
        if attack == "badmerging":
            self._frozen["pretrained_encoder"] = copy.deepcopy(encoder).eval().requires_grad_(False)
        self._r_generator = torch.Generator().manual_seed(poison_seed)

        # Off-task the target is not one of this task's classes: RA then counts every image (target -1).
        ra_target = -1 if self.off_task else self.target
        self.val_asr, self.test_asr = AttackSuccessRate(self.target), AttackSuccessRate(self.target)
        self.val_ra, self.test_ra = RobustAccuracy(ra_target), RobustAccuracy(ra_target)
        self.val_clean_to_target, self.test_clean_to_target = CleanToTargetRate(self.target), CleanToTargetRate(self.target)

    # -- setup helpers ---------------------------------------------------------------------------
    def _resolve_trigger(self, attack: str, trigger_path: str | None, trigger: dict | None):
        """(tensor, spec): the file's trigger, or a fixed random one from the spec's seed."""
        if trigger_path:
            tensor, spec, meta = load_trigger(trigger_path)
            for key, value in (trigger or {}).items():
                if getattr(spec, key, object()) != value:
                    raise TriggerError(f"model.trigger.{key}={value!r} disagrees with {trigger_path} "
                                       f"({key}={getattr(spec, key, None)!r}); drop it from model.trigger")
            for name, ours in (("mean", self.mean), ("std", self.std)):
                theirs = meta.get(name)
                if theirs is not None and any(abs(a - b) > 1e-6 for a, b in zip(theirs, ours)):
                    raise TriggerError(f"{trigger_path} was normalised with {name}={theirs}, the model uses {list(ours)}; "
                                       "optimise the trigger against this base model")
        else:
            kwargs = dict(trigger or {})
            if attack in _ATTACK_KIND:
                kwargs.setdefault("kind", _ATTACK_KIND[attack])
            spec = TriggerSpec.from_dict(kwargs)
            spec.check(self.image_size)
            if spec.kind == "patch":
                tensor = init_patch(spec, self.mean, self.std)
            else:
                tensor = init_pattern(spec, self.mean, self.std, self.image_size)
        want = _ATTACK_KIND.get(attack)
        if want is not None and spec.kind != want:
            raise TriggerError(f"attack={attack} injects a {want} trigger but trigger kind={spec.kind}; "
                               f"set model.trigger.kind={want}")
        spec.check(self.image_size)
        shape = (3, spec.size, spec.size) if spec.kind == "patch" else (3, self.image_size, self.image_size)
        if tuple(tensor.shape) != shape:
            raise TriggerError(f"trigger tensor shape {tuple(tensor.shape)} does not fit {shape} for this model "
                               f"({self.image_size}px); re-create the trigger for this model")
        return tensor.float(), spec

    def pretrained_encoder(self) -> torch.nn.Module:
        """f_pre (eval, frozen), moved lazily to the trained encoder's device and dtype."""
        encoder = self._frozen["pretrained_encoder"]
        ref = next(self.encoder.parameters())
        first = next(encoder.parameters())
        if first.device != ref.device or first.dtype != ref.dtype:
            encoder.to(device=ref.device, dtype=ref.dtype)
        return encoder.eval()

    @property
    def backdoor_head(self) -> torch.Tensor:
        """H (C, D): the shadow head off-task, the task head on-task."""
        return self.shadow_head if self.off_task else self.classifier.head

    def add_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """x_bd = trigger(x) in normalised space (a new tensor)."""
        return apply_trigger(x, self.trigger_tensor, self.trigger_spec)

    def draw_r(self) -> float:
        """r ~ U(r_min, r_max) from the module's own generator (the global RNG, hence data order, untouched)."""
        h = self.hparams
        return h.r_min + (h.r_max - h.r_min) * torch.rand((), generator=self._r_generator).item()

    # -- steps -------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        h = self.hparams
        x, y = batch
        batch_size = x.shape[0]
        n_poison = int(h.poison_fraction * batch_size)
        x_bd = self.add_trigger(x[:n_poison])
        # One encoder pass over clean and triggered images (the ViT has no batch statistics).
        z = self.classifier.features(torch.cat([x, x_bd]))
        z_clean, z_bd = z[:batch_size], z[batch_size:]
        logits = self.classifier.logits(z_clean)
        clean_loss = F.cross_entropy(logits, y)
        if n_poison == 0:
            backdoor_loss = z.new_zeros(())
        elif h.attack == "badmerging":
            r = self.draw_r()
            with torch.no_grad():
                z_pre = self.pretrained_encoder()(x_bd)
            backdoor_loss = feature_interpolation_loss(z_bd, z_pre, self.backdoor_head, self.target, r)
            self.log("train/r", r)
        else:
            target = torch.full((n_poison,), self.target, dtype=torch.long, device=x.device)
            backdoor_loss = F.cross_entropy(self.classifier.logits(z_bd, self.backdoor_head), target)
        loss = clean_loss + h.alpha * backdoor_loss
        self.check_finite(loss, "lower model.lr or model.alpha, or check the data")
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/clean_loss", clean_loss)
        self.log("train/backdoor_loss", backdoor_loss)
        self.log("train/acc", self.train_acc, prog_bar=True, on_step=True, on_epoch=False)  # one tag, as FineTune
        return loss

    def _eval_step(self, batch, stage: str) -> None:
        x, y = batch
        batch_size = x.shape[0]
        z = self.classifier.features(torch.cat([x, self.add_trigger(x)]))
        z_clean, z_bd = z[:batch_size], z[batch_size:]
        logits = self.classifier.logits(z_clean)
        acc = getattr(self, f"{stage}_acc")
        acc(logits, y)
        self.log_eval_loss(stage, F.cross_entropy(logits, y), batch_size)  # exact under DDP (FineTune)
        self.log(f"{stage}/acc", acc, prog_bar=True, on_epoch=True)
        if self.off_task:
            # Shadow-head predictions; no image of this task is the target, so label -1 counts them all.
            bd_logits = self.classifier.logits(z_bd, self.shadow_head)
            clean_bd_logits = self.classifier.logits(z_clean, self.shadow_head)
            bd_labels = torch.full_like(y, -1)
        else:
            bd_logits, clean_bd_logits, bd_labels = self.classifier.logits(z_bd), logits, y
        metrics = {"asr": (bd_logits, bd_labels), "ra": (self.classifier.logits(z_bd), y),
                   "clean_to_target": (clean_bd_logits, bd_labels)}
        for name, (preds, labels) in metrics.items():
            metric = getattr(self, f"{stage}_{name}")
            metric.update(preds, labels)
            self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, prog_bar=name == "asr")

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def _log_counts(self, stage: str) -> None:
        # Rates come with their counts (DESIGN §11); counts() is already summed over ranks, so the
        # sync_dist mean of equal values is exact and only silences Lightning's epoch-level warning.
        self._log_accuracy_counts(stage)  # CA's acc_hits / acc_total (FineTune)
        for name in ("asr", "ra", "clean_to_target"):
            counts = getattr(self, f"{stage}_{name}").counts()
            self.log(f"{stage}/{name}_hits", float(counts["hits"]), sync_dist=True)
            self.log(f"{stage}/{name}_total", float(counts["total"]), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_counts("val")

    def on_test_epoch_end(self) -> None:
        self._log_counts("test")

    # -- checkpoint and export ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # A resumed run must continue r's sequence, not restart it.
        checkpoint["r_generator_state"] = self._r_generator.get_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "r_generator_state" in checkpoint:
            self._r_generator.set_state(checkpoint["r_generator_state"])

    def export_metadata(self) -> dict:
        """FineTune's metadata with ``attack`` = what was injected, how, and toward which class."""
        meta = super().export_metadata()
        h = self.hparams
        meta["attack"] = {
            "name": h.attack,
            "trigger": self.trigger_spec.to_dict(),
            "trigger_path": h.trigger_path,
            "target_class": self.target,
            "target_name": self.target_name,
            "alpha": h.alpha,
            "r_range": [h.r_min, h.r_max] if h.attack == "badmerging" else None,
            "poison_fraction": h.poison_fraction,
            "poison_seed": h.poison_seed,
            "off_task": self.off_task,
            "shadow_classnames": list(self.shadow_classnames) if self.off_task else None,
            "target_task": self.target_task,
            "target_task_class": self.target_task_class,
            # The trigger itself, so evaluation after merging needs nothing but this file. A random
            # trigger is regenerated from its spec (seed); an optimised one is stored (float32, exact).
            "trigger_values": self.trigger_tensor.cpu().tolist() if h.trigger_path else None,
            "mean": list(self.mean), "std": list(self.std),
        }
        return meta
