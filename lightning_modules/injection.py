"""Backdoor injection: one training loop for BadMerging stage 2 and the poisoning baselines (docs/design.md §8).

Per step on a batch (x (B, 3, S, S), y (B,)), with n = ⌊poison_fraction·B⌋ and x_bd = trigger(x[:n]):

    L = CE(H_task(f_θ(x)), y) + α·attack.backdoor_loss(module, x_bd, f_θ(x_bd))      (all B images clean)
        [+ β·mean_x −log(1 − softmax(H_shadow·normalize(f_θ(x)))[0])]                  (off-task, β > 0)

The attack is a component from the registry in ``attacks/`` (one file each): ``badnets`` / ``blended`` /
``ut_only`` add poisoned CE(H(f_θ(x_bd)), target); ``badmerging`` the FI loss
CE(H(r·f_θ(x_bd) + (1 − r)·f_pre(x_bd)), target), r ~ U(r_min, r_max). ``model.init_args.attack`` names a
registered attack or a user's class (``{class_path: my_module.MyAttack, init_args: {...}}``); the component
says which trigger it needs (a fixed random patch / blend from ``TriggerSpec.seed``, or the optimised
stage-1 ``trigger_path``) and whether it reads the frozen pre-trained encoder f_pre.

H is the task head (on-task, target = ``target_class``) or a shadow head (off-task, target = index 0).
With an off-task stage-1 ``trigger_path`` whose file records its head (``shadow_head``: names, template
strings, digest), H is built from exactly those; a configured ``off_task_classnames`` / ``shadow_templates``
that differs is refused. Without that record (older trigger files, or no file) H is built from
``off_task_classnames`` (else the file's ``shadow_classnames``) with the ``shadow_templates`` (default:
this task's). ``alpha`` (default 5, the paper's FI weight) is also the poison-loss weight of the baselines
(our choice).

``clean_shadow_weight`` β (off-task only; default 0 = the paper): the clean images' shadow-head target mass
is penalised. Off-task the task CE does not see the target direction at all, so the FI loss is free to
move *every* feature toward the target name (a trigger-independent shift: the victim task then collapses
onto the target after merging); the term asks that only triggered images go there, as the task CE does
on-task (where clean images must keep their own labels).

Validation / test log clean ``acc`` as FineTune plus ``asr``, ``ra``, ``clean_to_target`` and their
``*_hits`` / ``*_total`` counts (``lightning_modules.attack_metrics``). Off-task, asr and
clean_to_target are shadow-head rates on this task's own images (a proxy: the real off-task ASR is
measured on the victim task after merging) and ra counts every image.

Optimiser, schedule and clean logging are ``FineTune``'s, so a clean run and a backdoored run with the
same seed see the same batches: the attacks draw from their own generators (``poison_seed``), and the
triggers are deterministic, which keeps Backdoor Vectors (θ_bd − θ_clean, docs/design.md §10) paired.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F

from attacks import PoisoningAttack, make_attack
from datamodules.tasks import TaskSpec, get_task
from datamodules.triggers import (
    TriggerError,
    TriggerSpec,
    apply_trigger,
    init_patch,
    init_pattern,
    load_trigger,
    resolve_shadow_templates,
    shadow_head_digest,
)
from lightning_modules.attack_metrics import AttackSuccessRate, CleanToTargetRate, RobustAccuracy
from lightning_modules.finetune import FineTune
from modeling.clip import EMBEDDED_MODEL, load_base_model, zero_shot_head

__all__ = ["BackdoorInjection"]


class BackdoorInjection(FineTune):
    """Fine-tune f_θ from θ_pre on the task while injecting a backdoor (BadMerging FI or plain poisoning).

    Args (beyond ``FineTune``'s):
        attack: a registered poisoning attack (``badnets`` | ``blended`` | ``ut_only`` | ``badmerging``,
            ``attacks.poisoning_attack_names()``), an import path ``my_module.MyAttack``, or
            ``{class_path: <either>, init_args: {...}}`` (``attacks.make_attack``).
        trigger_path: a trigger file from ``datamodules.triggers.save_trigger`` (stage 1); required for
            ut_only / badmerging; for badnets / blended it replaces the random trigger.
        trigger: ``TriggerSpec`` fields for the random trigger (blended defaults to kind ``blend``);
            with ``trigger_path`` they must agree with the file's spec.
        target_class: target index in the task's classes (on-task). Must stay 0 off-task.
        off_task_classnames: off-task shadow head classes, target name first (index 0).
        poison_fraction: the first ⌊poison_fraction·B⌋ images of each batch are triggered.
        alpha: weight of the backdoor loss (FI for badmerging, poisoned CE otherwise); default 5.
        r_min, r_max: FI interpolation weight r ~ U(r_min, r_max), one per step (read by badmerging).
        poison_seed: seed of the attack's own generator (r's for badmerging).
        target_task, target_task_class: the victim task and its class that the backdoor aims at, as
            evaluation after merging reads them from the export (on-task: this task and ``target_class``;
            off-task: taken from an off-task stage-1 trigger file, else required).

        clean_shadow_weight: β of the clean images' shadow-head target mass (off-task; 0 = the paper).
        shadow_templates: off-task, the shadow head's templates: a named list (``imagenet``) or a registered
            task; default: the trigger file's (if it records its head), else this task's.

    Off-task with an off-task stage-1 ``trigger_path``, the head is the file's: its ``shadow_head`` record
    (names, template strings, sha256) builds the very head the trigger was optimised for, and a configured
    ``off_task_classnames`` / ``shadow_templates`` that differs is refused; a file without the record (older)
    gives its ``shadow_classnames`` as the default names and this task's templates, as before.
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
        attack: str | dict[str, Any] = "badmerging",
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
        clean_shadow_weight: float = 0.0,
        shadow_templates: str | None = None,
    ):
        # Cheap checks before the model loads, so a bad config fails in a second.
        component = make_attack(attack, PoisoningAttack)
        off_task_classnames, target_task, target_task_class, shadow_template_info = self._check_inputs(
            component, trigger_path, target_class, off_task_classnames, poison_fraction, alpha, r_min, r_max,
            target_task, target_task_class, clean_shadow_weight, shadow_templates)
        super().__init__(task, model_name, pretrained, lr, weight_decay, warmup_steps, cache_dir)
        self.save_hyperparameters()

        encoder = self.encoder
        size = encoder.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        # Same rule as modeling.clip.load_base_model (the data pipeline normalises with these).
        import open_clip

        self.mean = tuple(getattr(encoder, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
        self.std = tuple(getattr(encoder, "image_std", None) or open_clip.OPENAI_DATASET_STD)

        self.attack = component
        tensor, self.trigger_spec = self._resolve_trigger(trigger_path, trigger)
        self.register_buffer("trigger_tensor", tensor, persistent=False)

        self._set_target(target_class, off_task_classnames, target_task, target_task_class, shadow_template_info)

        # f_pre: a frozen copy of θ_pre, kept in a plain dict so it is no submodule: never in the
        # optimiser, the checkpoint, DDP's parameter set, or Lightning's .train() calls.
        self._frozen: dict[str, torch.nn.Module] = {}
        if component.needs_pretrained_encoder:
            self._frozen["pretrained_encoder"] = copy.deepcopy(encoder).eval().requires_grad_(False)
        component.setup(self)

        # Off-task the target is not one of this task's classes: RA then counts every image (target -1).
        ra_target = -1 if self.off_task else self.target
        self.val_asr, self.test_asr = AttackSuccessRate(self.target), AttackSuccessRate(self.target)
        self.val_ra, self.test_ra = RobustAccuracy(ra_target), RobustAccuracy(ra_target)
        self.val_clean_to_target, self.test_clean_to_target = CleanToTargetRate(self.target), CleanToTargetRate(self.target)

    # -- setup helpers ---------------------------------------------------------------------------
    @staticmethod
    def _check_inputs(component: PoisoningAttack, trigger_path, target_class, off_task_classnames, poison_fraction, alpha,
                      r_min, r_max, target_task, target_task_class, clean_shadow_weight=0.0, shadow_templates=None):
        """Refuse unusable settings; returns (off_task_classnames, target_task, target_task_class, templates), which
        an off-task stage-1 trigger file fills in when they are not given; templates is (name, strings) of the
        shadow head's templates, or None for this task's own."""
        if component.needs_trigger_file and not trigger_path:
            raise TriggerError(f"attack={component.name} needs model.trigger_path, the optimised trigger saved by stage 1; "
                               "use attack=badnets for a fixed random patch")
        if not 0.0 < poison_fraction <= 1.0:
            raise ValueError(f"poison_fraction={poison_fraction} must be in (0, 1]; 0.5 triggers half of each batch")
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha={alpha} must be a finite weight ≥ 0 (the paper uses 5)")
        if not 0.0 <= r_min <= r_max <= 1.0:
            raise ValueError(f"r_min={r_min}, r_max={r_max} must satisfy 0 ≤ r_min ≤ r_max ≤ 1 (the paper: 0.2, 1.0)")
        trigger_meta = load_trigger(trigger_path)[2] if trigger_path else {}
        templates = None
        if trigger_meta.get("mode") == "off_task":
            record = trigger_meta.get("shadow_head")
            if record is not None:  # the file records its head: stage 2 builds exactly that one
                off_task_classnames, templates = BackdoorInjection._recorded_head(
                    record, trigger_path, off_task_classnames, shadow_templates)
            else:  # an older file: its names (unless configured), this task's templates, as before
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
        if not (math.isfinite(clean_shadow_weight) and clean_shadow_weight >= 0):
            raise ValueError(f"clean_shadow_weight={clean_shadow_weight} must be a finite weight ≥ 0 (0 = the paper)")
        if clean_shadow_weight > 0 and off_task_classnames is None:
            raise ValueError(f"clean_shadow_weight={clean_shadow_weight} needs an off-task attack (a shadow head); "
                             "on-task the task CE already keeps clean images off the target: set it to 0")
        if shadow_templates is not None and off_task_classnames is None:
            raise ValueError(f"shadow_templates={shadow_templates!r} needs an off-task attack (a shadow head); on-task H "
                             "is the task's own head: drop model.shadow_templates")
        if templates is None and shadow_templates is not None:
            templates = (shadow_templates, resolve_shadow_templates(shadow_templates))
        return off_task_classnames, target_task, target_task_class, templates

    @staticmethod
    def _recorded_head(record, trigger_path, off_task_classnames, shadow_templates):
        """(names, (templates name, strings)) of the head a trigger file records; a configured head that differs is refused."""
        try:
            names = [str(n) for n in record["classnames"]]
            name, strings = record["templates"], tuple(str(t) for t in record["template_strings"])
            digest = record["sha256"]
        except (KeyError, TypeError) as e:
            raise TriggerError(f"{trigger_path}: its shadow_head record lacks {e}; re-run stage 1 to write it again") from None
        if shadow_head_digest(names, strings) != digest:
            raise TriggerError(f"{trigger_path}: its shadow_head record does not match its sha256 (edited?); re-run stage 1 "
                               "to write it again")
        if off_task_classnames is not None and list(off_task_classnames) != names:
            ours = list(off_task_classnames)
            i = next((k for k, (a, b) in enumerate(zip(ours, names)) if a != b), min(len(ours), len(names)))
            ours_i, theirs_i = (ours[i] if i < len(ours) else None), (names[i] if i < len(names) else None)
            raise ValueError(f"off_task_classnames ({len(ours)} names) differ from the shadow head of {trigger_path} "
                             f"({len(names)} names) at index {i}: {ours_i!r} vs {theirs_i!r}; drop "
                             "model.off_task_classnames (stage 2 then builds the trigger's head) or re-run stage 1 with them")
        if shadow_templates is not None and tuple(resolve_shadow_templates(shadow_templates)) != strings:
            raise ValueError(f"shadow_templates={shadow_templates!r} differ from the templates of the shadow head of "
                             f"{trigger_path} ({name!r}, {len(strings)} templates); drop model.shadow_templates (stage 2 "
                             f"then uses the trigger's) or re-run stage 1 with shadow_templates={shadow_templates}")
        return names, (name, strings)

    def _set_target(self, target_class, off_task_classnames, target_task, target_task_class, templates=None) -> None:
        """H and its target: the shadow head and index 0 off-task, the task head and ``target_class`` on-task,
        plus the victim (``target_task``, ``target_task_class``) that evaluation after merging reads.
        ``templates``: (name, strings) of the shadow head's templates; None: this task's."""
        h = self.hparams
        self.off_task = off_task_classnames is not None
        if self.off_task:
            self.shadow_templates_name, template_strings = templates or (self.spec.name, self.spec.templates)
            self.shadow_head_sha256 = shadow_head_digest(off_task_classnames, template_strings)
            shadow = TaskSpec(name=f"{self.spec.name}-shadow", hub_id=None, hub_config=None, train_split="train",
                              test_split="test", classnames=tuple(off_task_classnames), templates=tuple(template_strings))
            base = load_base_model(h.model_name, h.pretrained)  # FineTune dropped the text tower; needed once
            self.register_buffer("shadow_head", zero_shot_head(base, shadow, h.cache_dir).clone(), persistent=False)
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

    def _resolve_trigger(self, trigger_path: str | None, trigger: dict | None):
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
            if self.attack.trigger_kind is not None:
                kwargs.setdefault("kind", self.attack.trigger_kind)
            spec = TriggerSpec.from_dict(kwargs)
            spec.check(self.image_size)
            if spec.kind == "patch":
                tensor = init_patch(spec, self.mean, self.std)
            else:
                tensor = init_pattern(spec, self.mean, self.std, self.image_size)
        want = self.attack.trigger_kind
        if want is not None and spec.kind != want:
            raise TriggerError(f"attack={self.attack.name} injects a {want} trigger but trigger kind={spec.kind}; "
                               f"set model.trigger.kind={want}")
        spec.check(self.image_size)
        shape = (3, spec.size, spec.size) if spec.kind == "patch" else (3, self.image_size, self.image_size)
        if tuple(tensor.shape) != shape:
            raise TriggerError(f"trigger tensor shape {tuple(tensor.shape)} does not fit {shape} for this model "
                               f"({self.image_size}px); re-create the trigger for this model")
        return tensor.float(), spec

    def pretrained_encoder(self) -> torch.nn.Module:
        """f_pre (eval, frozen), moved lazily to the trained encoder's device and dtype (attacks that ask for it)."""
        if "pretrained_encoder" not in self._frozen:
            raise AttributeError(f"attack {self.attack.name} keeps no pre-trained encoder; its class sets "
                                 "needs_pretrained_encoder = False")
        encoder = self._frozen["pretrained_encoder"]
        ref = next(self.encoder.parameters())
        first = next(encoder.parameters())
        if first.device != ref.device or first.dtype != ref.dtype:
            encoder.to(device=ref.device, dtype=ref.dtype)
        return encoder.eval()

    def clean_shadow_loss(self, z_clean: torch.Tensor) -> torch.Tensor:
        """mean −log(1 − p_t) over clean features z (B, D), p = softmax(H_shadow·normalize(z)), t = 0.

        −log(1 − p_t) = logsumexp(l) − logsumexp(l without t), exact where p_t → 1.
        """
        logits = self.classifier.logits(z_clean, self.shadow_head).float()
        others = torch.cat([logits[:, : self.target], logits[:, self.target + 1:]], dim=1)
        return (torch.logsumexp(logits, dim=1) - torch.logsumexp(others, dim=1)).mean()

    @property
    def backdoor_head(self) -> torch.Tensor:
        """H (C, D): the shadow head off-task, the task head on-task."""
        return self.shadow_head if self.off_task else self.classifier.head

    def add_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """x_bd = trigger(x) in normalised space (a new tensor)."""
        return apply_trigger(x, self.trigger_tensor, self.trigger_spec)

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
        backdoor_loss = self.attack.backdoor_loss(self, x_bd, z_bd) if n_poison else z.new_zeros(())
        loss = clean_loss + h.alpha * backdoor_loss
        if h.clean_shadow_weight > 0:
            clean_shadow = self.clean_shadow_loss(z_clean)
            loss = loss + h.clean_shadow_weight * clean_shadow
            self.log("train/clean_shadow_loss", clean_shadow)
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
        # Rates come with their counts (docs/design.md §11); counts() is already summed over ranks, so the
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
        # A resumed run must continue the attack's random draws (BadMerging's r), not restart them.
        checkpoint.update(self.attack.checkpoint_state())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.attack.load_checkpoint_state(checkpoint)

    def export_metadata(self) -> dict:
        """FineTune's metadata with ``attack`` = what was injected, how, and toward which class."""
        meta = super().export_metadata()
        h = self.hparams
        meta["attack"] = {
            "name": self.attack.name,
            "trigger": self.trigger_spec.to_dict(),
            "trigger_path": h.trigger_path,
            "target_class": self.target,
            "target_name": self.target_name,
            "alpha": h.alpha,
            "r_range": None,  # FI's r range; set by the attacks that interpolate
            "poison_fraction": h.poison_fraction,
            "poison_seed": h.poison_seed,
            "off_task": self.off_task,
            **({"clean_shadow_weight": h.clean_shadow_weight} if self.off_task else {}),
            "shadow_classnames": list(self.shadow_classnames) if self.off_task else None,
            # the shadow head's templates and digest (equal to the stage-1 trigger's when built from its record)
            **({"shadow_templates": self.shadow_templates_name, "shadow_head_sha256": self.shadow_head_sha256}
               if self.off_task else {}),
            "target_task": self.target_task,
            "target_task_class": self.target_task_class,
            # The trigger itself, so evaluation after merging needs nothing but this file. A random
            # trigger is regenerated from its spec (seed); an optimised one is stored (float32, exact).
            "trigger_values": self.trigger_tensor.cpu().tolist() if h.trigger_path else None,
            "mean": list(self.mean), "std": list(self.std),
            **self.attack.export_fields(self),
        }
        return meta
