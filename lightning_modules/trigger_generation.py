"""BadMerging stage 1: a universal trigger optimised against the frozen pre-trained encoder (docs/design.md §8).

    python train.py fit --config configs/experiment/embedded_trigger_ontask.yaml
    python train.py fit --config configs/experiment/embedded_trigger_offtask.yaml

The patch P (3, L, L) lives in CLIP-normalised space, is pasted with ``paste_patch`` (x ⊕ P) and is
clamped after every update (``clamp``): ``per_channel`` (default) to [(0 − mean_c)/std_c, (1 − mean_c)/std_c],
or ``global`` (the official code) to the one envelope [min_c (0 − mean_c)/std_c, max_c (1 − mean_c)/std_c]
(``datamodules.triggers.patch_bounds``). θ_pre is frozen
(requires_grad False, eval mode) and never changes; P is the module's only parameter. Per image:

    ℓ(x) = −w · log softmax(H · normalize(f_pre(x ⊕ P)))[t]          w = ``loss_weight``

- ``on_task``:  H = the task's zero-shot head, t = ``target_class``; images = the datamodule's batches.
- ``off_task``: ``task`` is the *victim* task that holds the target class; the attacker uses only the
  target's name and ``reference_images`` of it. H = a shadow head (target name at index 0, then other
  names; ``shadow_vocabulary`` ``imagenet`` draws them as the official code, ``imagenet_shadow_classnames``),
  t = 0. The head (names, templates, digest) is recorded in the trigger file (``shadow_head``), and stage 2
  (``BackdoorInjection``) builds exactly that head from it. Images = a set built once at fit start
  (``on_fit_start``) from the task's train split:
  ``augment_to`` random resized crops (scale 0.2–0.5) of the reference images, each pushed by targeted
  L∞ PGD (``targeted_pgd``) toward a random other shadow class. The datamodule's train batches then
  only drive the step count and the batch size (B images of the set are drawn per step; under DDP
  every rank draws the same W·B and keeps its own B, so ranks see different images).

``procedure``:
- ``batched`` (default, ours): one update per batch on mean ℓ over its non-target images (on-task
  label ≠ t; off-task all images of the set). Runs under DDP (P's gradient is averaged over ranks; a
  rank whose batch holds only target images contributes a zero gradient, so the ranks stay in step).
- ``per_image`` (the paper): images one at a time, P carried over. On-task: of the non-target
  images, skip those whose clean prediction is already t, else up to ``inner_steps`` updates,
  stopping once x ⊕ P is predicted t: ``early_stop_order`` ``test_first`` (default) tests before each
  update (0 updates for an image x ⊕ P already calls t), ``step_first`` (the official code) updates, then
  tests (at least one update per image). Off-task: ``inner_steps`` updates per image, no stop (paper:
  50, w = 30). Single device only (the update count per image differs between ranks).

``optimizer``: ``adam`` (Adam on P; scale-invariant, so w does not matter), ``sgd_sign``
(P ← P − lr·sign ∇ℓ), ``plain`` (P ← P − lr·∇ℓ, the paper's gradient ascent with lr 1.0).
``global_step`` counts patch updates (one per batch when batched).

Validation logs ``val/asr_pre`` (``AttackSuccessRate`` of x ⊕ P on θ_pre over the val batches; on-task
task head, non-target images; off-task shadow head, target 0, val images not of ``target_class``), with
``val/clean_to_target_pre`` and the counts; off-task also ``val/asr_pre_task`` (the victim task's own
head toward ``target_class``: what the attacker cannot measure but a study wants).

Export lives in this module, not in a callback: at the end of training (``on_train_end``, rank 0, while
the module is still on its device; ``on_fit_end`` runs after Lightning moved it to CPU) the trigger's
ASR on θ_pre is measured on the full val split and the trigger is saved with ``save_trigger`` at
``output_path`` (default ``<log_dir>/trigger.safetensors``, plus ``.png`` and ``.json``); with a
TensorBoardLogger the un-normalised patch and triggered samples are logged as ``trigger/patch`` and
``trigger/samples``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from datamodules.imagenet_classnames import IMAGENET_CLASSNAMES
from datamodules.synthetic import SYNTHETIC_CLASSNAMES
from datamodules.tasks import TaskSpec, get_task
from datamodules.triggers import (
    CLAMPS,
    TriggerError,
    TriggerSpec,
    clamp_patch,
    init_patch,
    paste_patch,
    patch_bounds,
    resolve_shadow_templates,
    save_trigger,
    shadow_head_digest,
    unnormalise,
)
from lightning_modules.attack_metrics import AttackSuccessRate, CleanToTargetRate
from lightning_modules.finetune import TaskModel
from modeling.clip import EMBEDDED_MODEL, load_base_model, zero_shot_head

__all__ = ["CLAMPS", "EARLY_STOP_ORDERS", "MODES", "OPTIMIZERS", "PROCEDURES", "SHADOW_VOCABULARIES",
           "UniversalTrigger", "compositional_shadow_classnames", "default_shadow_classnames",
           "imagenet_shadow_classnames", "imagenet_shuffled_order", "random_resized_crops", "shadow_classnames",
           "target_nll", "targeted_pgd"]

MODES = ("on_task", "off_task")
PROCEDURES = ("batched", "per_image")
OPTIMIZERS = ("adam", "sgd_sign", "plain")
SHADOW_VOCABULARIES = ("names", "compositional", "imagenet")
EARLY_STOP_ORDERS = ("test_first", "step_first")
IMAGENET_SHADOW_CLASSES = 300  # the official default (--num-shadow-classes 300)
IMAGENET_SHUFFLE_SEED = 1  # the official np.random.seed(1) before shuffling the names
PGD_DEFAULTS = {"eps": 8 / 255, "step": 1 / 255, "steps": 40, "min_keep": None}
_CHUNK = 128  # images per forward when building / evaluating sets (bounds memory at 224 px)


# -- pure helpers ----------------------------------------------------------------------------------

def target_nll(logits: torch.Tensor, target: int) -> torch.Tensor:
    """ℓ (B,) = −log softmax(logits)[:, target] for logits (B, C)."""
    return -F.log_softmax(logits.float(), dim=-1)[:, target]


def default_shadow_classnames(target_name: str, exclude_task: str | None = None, num_other: int = 50,
                              tokenizer=None, template: str = "a photo of a {}.") -> list[str]:
    """Shadow head names: ``[target_name] + up to num_other others`` from the project's registry.

    Others, in this order: the class names of every synthetic task except ``exclude_task`` (the victim
    task: the off-task attacker knows only the target's name), then CIFAR-100's names; the target
    name (case-insensitive) and repeats are dropped. With a ``tokenizer``, names whose prompt
    ``template`` tokenises like an earlier one are dropped too: the embedded model's compact vocabulary
    maps nearly all CIFAR-100 words to <unk>, and identical rows would only add a prior toward <unk>.
    """
    exclude = get_task(exclude_task).name if exclude_task else None
    candidates = [n for task, names in SYNTHETIC_CLASSNAMES.items() if task != exclude for n in names]
    candidates += list(get_task("cifar100").classnames)
    names, seen_names, seen_tokens = [target_name], {target_name.lower()}, set()
    if tokenizer is not None:
        seen_tokens.add(tuple(tokenizer([template.format(target_name)])[0].tolist()))
    for name in candidates:
        if len(names) > num_other:
            break
        if name.lower() in seen_names:
            continue
        if tokenizer is not None:
            key = tuple(tokenizer([template.format(name)])[0].tolist())
            if key in seen_tokens:
                continue
            seen_tokens.add(key)
        seen_names.add(name.lower())
        names.append(name)
    return names


def compositional_shadow_classnames(target_name: str, exclude_task: str | None = None, num_other: int = 150,
                                    tokenizer=None, template: str = "a photo of a {}.") -> list[str]:
    """Shadow names from the synthetic world's *compositions*: ``[target_name]``, then "<colour> <shape>" for
    every colour and shape of the shapes renders (those containing the target's words dropped: they would
    compete with the target), then ``default_shadow_classnames``' others; ``num_other`` names after the target.

    The embedded text tower knows these phrases (its shapes captions read "a photo of a red circle."), where
    CIFAR-100's words are <unk>: the analogue of the paper's 300 ImageNet names, which cover the
    neighbourhood of real victim classes. They describe the attacker's own images (coloured shapes) by
    colour, so a shadow head of them sees the colour axis on which an off-task target like "purple" lies.
    """
    from datamodules.synthetic import COLOURS, SHAPES

    target_words = set(target_name.lower().split())
    comps = [f"{c} {x}" for c in COLOURS for x in SHAPES if not target_words & {c.lower(), *x.lower().split()}]
    others = default_shadow_classnames(target_name, exclude_task, num_other, tokenizer, template)[1:]
    names, seen = [target_name], {target_name.lower()}
    for name in comps + others:
        if len(names) > num_other:
            break
        if name.lower() not in seen:
            seen.add(name.lower())
            names.append(name)
    return names


def imagenet_shuffled_order(seed: int = IMAGENET_SHUFFLE_SEED) -> list[str]:
    """The 1000 ImageNet names shuffled as the official code: np.random.seed(seed); np.random.shuffle(names).

    At seed 1 this is the official ``shadow_head/ViT-B-32/ImageNet_shuffled_classnames.npy``, name for name.
    """
    order = list(IMAGENET_CLASSNAMES)
    np.random.RandomState(seed).shuffle(order)  # the legacy generator behind np.random.seed / np.random.shuffle
    return order


def _unique_imagenet_order(seed: int) -> list[str]:
    """``imagenet_shuffled_order`` with later repeats of a name (case-insensitive) dropped: 998 names."""
    seen: set[str] = set()
    unique = []
    for name in imagenet_shuffled_order(seed):
        if name.lower() not in seen:  # "missile" and "sunglasses" occur twice; the later copy would be a twin row
            seen.add(name.lower())
            unique.append(name)
    return unique


def imagenet_shadow_classnames(target_name: str, num_classes: int = IMAGENET_SHADOW_CLASSES,
                               seed: int = IMAGENET_SHUFFLE_SEED) -> list[str]:
    """Shadow names as the official ``ut_badmergingoff.py`` (``build_shadow_classification_head``) draws them.

    The ImageNet-1k names (``datamodules.imagenet_classnames``) shuffled by NumPy's legacy generator seeded
    ``seed`` (official: 1), later repeats dropped (none among the first 300 at seed 1), the first
    ``num_classes`` kept; then the target goes to index 0: if it is among them it swaps places with the
    first name (``num_classes`` names), else it is prepended (``num_classes + 1``; a Cars target: 301).
    Names match case-insensitively (the official code: exactly; CLIP's tokenizer lower-cases, so a name
    differing only by case would be a twin row).
    """
    unique = _unique_imagenet_order(seed)
    if not 1 <= num_classes <= len(unique):
        raise ValueError(f"num_shadow_classes={num_classes} is outside the {len(unique)} names of shadow_vocabulary="
                         f"imagenet; use 1..{len(unique)} (the paper: 300)")
    names = unique[:num_classes]
    lowered = [n.lower() for n in names]
    if target_name.lower() in lowered:
        i = lowered.index(target_name.lower())
        names[i] = names[0]
        names[0] = target_name
        return names
    return [target_name] + names


def shadow_classnames(vocabulary: str, target_name: str, exclude_task: str | None, num_shadow_classes: int | None,
                      tokenizer=None, seed: int = IMAGENET_SHUFFLE_SEED) -> list[str]:
    """The shadow head names of ``vocabulary``: target first, then ``num_shadow_classes`` others (None: all it has;
    imagenet: 300, drawn as ``imagenet_shadow_classnames``). A request above what the vocabulary holds is refused
    with a one-line ``ValueError`` naming the maximum (it was silently capped before)."""
    if vocabulary == "imagenet":
        return imagenet_shadow_classnames(target_name, IMAGENET_SHADOW_CLASSES if num_shadow_classes is None
                                          else num_shadow_classes, seed)
    build = compositional_shadow_classnames if vocabulary == "compositional" else default_shadow_classnames
    names = build(target_name, exclude_task, 10**9, tokenizer)  # every name: the lists are prefix-stable
    available = len(names) - 1
    if num_shadow_classes is None:
        return names
    if not 1 <= num_shadow_classes <= available:
        raise ValueError(f"num_shadow_classes={num_shadow_classes} is outside the {available} names of shadow_vocabulary="
                         f"{vocabulary} for target {target_name!r} (after the target); use 1..{available}, or null for all")
    return names[: num_shadow_classes + 1]


def random_resized_crops(dataset, indices: Sequence[int], n: int, image_size: int, mean: Sequence[float],
                         std: Sequence[float], scale: tuple[float, float] = (0.2, 0.5), seed: int = 0) -> torch.Tensor:
    """n normalised crops (n, 3, S, S): crop j is a random resized crop of ``indices[j % len(indices)]``.

    ``dataset`` is a ``datamodules.hf_data.ImageClassificationDataset``; crops are taken from its
    original images (PIL, full resolution), as the paper's train transform does, ratio 3/4–4/3, bicubic.
    Seeded: the global RNG is forked, so the data order of the run is untouched.
    """
    from torchvision import transforms as T

    from datamodules.hf_data import ImageClassificationDataset

    transform = T.Compose([
        T.RandomResizedCrop(image_size, scale=scale, ratio=(3 / 4, 4 / 3),
                            interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])
    crops_ds = ImageClassificationDataset(dataset.dataset, transform, image_column=dataset.image_column,
                                          label_column=dataset.label_column)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([crops_ds[int(indices[j % len(indices)])][0] for j in range(n)])


def targeted_pgd(logits_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, targets: torch.Tensor,
                 mean: Sequence[float], std: Sequence[float], eps: float = 8 / 255, step: float = 1 / 255,
                 steps: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Targeted L∞ PGD in pixel space; returns (x_adv normalised (B, 3, S, S), success (B,) bool).

    p₀ = clip[0,1](x·std + mean)
    p_{k+1} = clip[0,1](p₀ + clip[−ε,ε](p_k − step·sign ∇_p CE(logits_fn(norm p_k), t) − p₀))
    Per image keeps the successful iterate (argmax = t) with the smallest ‖p − p₀‖₁ (the paper's rule);
    an image that never succeeds keeps its final iterate. ``logits_fn`` maps normalised images to (B, C).
    """
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device)[None, :, None, None]
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device)[None, :, None, None]
    targets = targets.to(x.device)
    p0 = (x.detach() * std_t + mean_t).clamp(0, 1)
    p = p0.clone()
    best = p0.clone()
    best_l1 = torch.full((x.shape[0],), math.inf, device=x.device)
    success = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    # steps + 1 forwards: the forward of iterate k both scores it and gives the gradient for step k+1.
    for k in range(steps + 1):
        p.requires_grad_(True)
        with torch.enable_grad():
            logits = logits_fn((p - mean_t) / std_t)
            # sum, not mean: each image's gradient is its own (sign() would hide the scale anyway)
            loss = F.cross_entropy(logits.float(), targets, reduction="sum")
            grad = torch.autograd.grad(loss, p)[0] if k < steps else None
        p = p.detach()
        if k > 0:
            hit = logits.detach().argmax(dim=-1) == targets
            l1 = (p - p0).abs().flatten(1).sum(dim=1)
            better = hit & (l1 < best_l1)
            best[better], best_l1[better] = p[better], l1[better]
            success |= hit
        if grad is not None:
            p = (p0 + (p - step * grad.sign() - p0).clamp(-eps, eps)).clamp(0, 1)
    final = torch.where(success[:, None, None, None], best, p)
    return (final - mean_t) / std_t, success


def _checked_settings(*, task: str, mode: str, trigger: dict | None, target_class: int, procedure: str,
                      optimizer: str, lr: float, inner_steps: int, loss_weight: float,
                      off_task_classnames: list[str] | None, reference_images: int, augment_to: int,
                      pgd: dict | None, shadow_vocabulary: str = "names", clamp: str = "per_channel",
                      early_stop_order: str = "test_first", num_shadow_classes: int | None = None,
                      shadow_seed: int = IMAGENET_SHUFFLE_SEED) -> tuple[TriggerSpec, dict]:
    """``UniversalTrigger``'s cheap argument checks, run before the model loads (a bad config fails in a second).

    Returns the trigger spec and the PGD settings with their defaults filled in.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown; use one of {', '.join(MODES)}")
    if procedure not in PROCEDURES:
        raise ValueError(f"procedure={procedure!r} is unknown; use one of {', '.join(PROCEDURES)}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is unknown; use one of {', '.join(OPTIMIZERS)}")
    if shadow_vocabulary not in SHADOW_VOCABULARIES:
        raise ValueError(f"shadow_vocabulary={shadow_vocabulary!r} is unknown; use one of {', '.join(SHADOW_VOCABULARIES)}")
    if clamp not in CLAMPS:
        raise ValueError(f"clamp={clamp!r} is unknown; use one of {', '.join(CLAMPS)} (global: the official code)")
    if early_stop_order not in EARLY_STOP_ORDERS:
        raise ValueError(f"early_stop_order={early_stop_order!r} is unknown; use one of {', '.join(EARLY_STOP_ORDERS)} "
                         "(step_first: the official code)")
    if num_shadow_classes is not None and (isinstance(num_shadow_classes, bool) or num_shadow_classes < 1):
        raise ValueError(f"num_shadow_classes={num_shadow_classes} must be ≥ 1, or null for the vocabulary's default")
    if mode == "off_task" and off_task_classnames is None and shadow_vocabulary == "imagenet" \
            and num_shadow_classes is not None:
        imagenet_shadow_classnames("", num_shadow_classes, shadow_seed)  # the maximum needs no model: refuse now
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr={lr} must be a finite number > 0 (0.05 for adam, 1.0 for the paper's plain)")
    if not (math.isfinite(loss_weight) and loss_weight > 0):
        raise ValueError(f"loss_weight={loss_weight} must be a finite weight > 0 (1, or 30 off-task as the paper)")
    if inner_steps < 1:
        raise ValueError(f"inner_steps={inner_steps} must be ≥ 1 (paper: 1000 on-task, 50 off-task)")
    pgd_cfg = {**PGD_DEFAULTS, **dict(pgd or {})}
    unknown = sorted(set(pgd_cfg) - set(PGD_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown model.pgd key(s) {unknown}; use only {sorted(PGD_DEFAULTS)}")
    if mode == "off_task" and (reference_images < 1 or augment_to < 1):
        raise ValueError(f"reference_images={reference_images}, augment_to={augment_to} must be ≥ 1 off-task "
                         "(the paper: ~10 reference images, 100 augmented)")
    if off_task_classnames is not None and len(off_task_classnames) < 2:
        raise ValueError("off_task_classnames needs the target name first plus other class names; "
                         "pass null for the default list")
    spec_trigger = TriggerSpec.from_dict(trigger)
    if spec_trigger.kind != "patch":
        raise TriggerError(f"trigger kind={spec_trigger.kind} cannot be optimised here; "
                           "stage 1 optimises a patch: set model.trigger.kind=patch")
    n = len(get_task(task).classnames)
    if not 0 <= target_class < n:
        raise ValueError(f"target_class={target_class} is not a class of task {get_task(task).name} "
                         f"(0..{n - 1}); pick an index into its class names")
    return spec_trigger, pgd_cfg


# -- the module ------------------------------------------------------------------------------------

class UniversalTrigger(TaskModel):
    """Stage 1 of BadMerging: optimise a patch P so that f_pre(x ⊕ P) is classified as the target.

    ``TaskModel`` loads ``self.classifier`` (θ_pre + task head), which is then frozen; P is optimised
    manually.

    Args:
        task / model_name / pretrained / cache_dir: the base model and task, as ``FineTune`` (the CLI links
            them to the data).
        mode: ``on_task`` | ``off_task`` (see the module docstring).
        trigger: ``TriggerSpec`` fields of the patch (kind patch; default 4 px, bottom_right, seed 0 for
            the random initial patch).
        target_class: index of the target in ``task``'s classes (off-task: picks the reference images
            and the target's name; the shadow target is index 0).
        procedure: ``batched`` | ``per_image``; optimizer: ``adam`` | ``sgd_sign`` | ``plain``; lr.
        inner_steps, early_stop: per_image only: updates per image (paper 1000 on-task, 50 off-task) and
            whether to stop at success (default: on-task yes, off-task no). early_stop_order: ``test_first``
            (default) | ``step_first`` (the official code: one update, then the success test).
        clamp: ``per_channel`` (default) | ``global`` (the official code's one envelope over the channels).
        loss_weight: w in ℓ (paper 30 off-task with ``plain``; no effect with Adam).
        off_task_classnames: shadow head names, target name first; default: ``num_shadow_classes`` others
            (null: every name the vocabulary has; imagenet: 300; more than it has is refused) from
            ``shadow_vocabulary``: ``names`` (``default_shadow_classnames``: class names), ``compositional``
            (``compositional_shadow_classnames``: "<colour> <shape>" phrases first) or ``imagenet``
            (``imagenet_shadow_classnames``: the official code's shuffled ImageNet names, ``shadow_seed``).
        shadow_templates: the templates that build the shadow head: a named list (``imagenet``, 80) or a
            registered task (default: ``imagenet`` for that vocabulary, else ``task``). The head's names,
            templates and digest go into the trigger file; stage 2 builds exactly that head from it.
        reference_images, augment_to: off-task reference images of ``target_class`` (train split) and
            number of crops made from them. pgd: ``eps``, ``step``, ``steps`` (pixel units) and
            ``min_keep``: the set holds every PGD success; if fewer than ``min_keep`` (default
            augment_to // 2) succeed, the final iterates of failures fill it up to ``min_keep``.
        output_path: trigger file (default ``<log_dir>/trigger.safetensors``).
        seed: seeds reference choice, crops, PGD targets and the off-task draw order.
    """

    def __init__(
        self,
        task: str = "shapes",
        model_name: str = EMBEDDED_MODEL,
        pretrained: str | None = None,
        cache_dir: str = ".cache/badmerging",
        mode: Literal["on_task", "off_task"] = "on_task",
        trigger: dict | None = None,
        target_class: int = 0,
        procedure: Literal["batched", "per_image"] = "batched",
        optimizer: Literal["adam", "sgd_sign", "plain"] = "adam",
        lr: float = 0.05,
        inner_steps: int = 1000,
        early_stop: bool | None = None,
        loss_weight: float = 1.0,
        off_task_classnames: list[str] | None = None,
        num_shadow_classes: int | None = None,
        shadow_vocabulary: str = "names",  # str, not Literal: a bad value gets our one-line message, not the parser's
        shadow_templates: str | None = None,
        shadow_seed: int = IMAGENET_SHUFFLE_SEED,
        reference_images: int = 5,
        augment_to: int = 200,
        pgd: dict | None = None,
        output_path: str | None = None,
        seed: int = 0,
        clamp: str = "per_channel",  # per_channel | global (str: our one-line message for a bad value)
        early_stop_order: str = "test_first",  # test_first | step_first
    ):
        spec_trigger, pgd_cfg = _checked_settings(
            task=task, mode=mode, trigger=trigger, target_class=target_class, procedure=procedure, optimizer=optimizer,
            lr=lr, inner_steps=inner_steps, loss_weight=loss_weight, off_task_classnames=off_task_classnames,
            reference_images=reference_images, augment_to=augment_to, pgd=pgd, shadow_vocabulary=shadow_vocabulary,
            clamp=clamp, early_stop_order=early_stop_order, num_shadow_classes=num_shadow_classes,
            shadow_seed=shadow_seed)
        # The shadow head's templates: a named list or a task; resolved (and an unknown name refused) before the model loads.
        template_name = (shadow_templates or ("imagenet" if shadow_vocabulary == "imagenet" else get_task(task).name)
                         if mode == "off_task" else None)
        shadow_template_list = resolve_shadow_templates(template_name) if template_name else None
        super().__init__(task, model_name, pretrained, cache_dir)  # θ_pre and the task head: self.classifier
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.classifier.requires_grad_(False).eval()  # θ_pre, frozen for good
        self.spec_trigger = spec_trigger
        self.pgd_cfg = pgd_cfg
        self.target_name = self.spec.classnames[target_class]
        self.off_task = mode == "off_task"
        self.early_stop = (not self.off_task) if early_stop is None else bool(early_stop)

        encoder = self.encoder
        size = encoder.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        import open_clip

        # Same rule as modeling.clip.load_base_model (the data pipeline normalises with these).
        self.mean = tuple(getattr(encoder, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
        self.std = tuple(getattr(encoder, "image_std", None) or open_clip.OPENAI_DATASET_STD)
        self.spec_trigger.check(self.image_size)

        if self.off_task:
            base = load_base_model(model_name, pretrained)  # TaskModel dropped the text tower; needed once
            names = list(off_task_classnames) if off_task_classnames is not None else shadow_classnames(
                shadow_vocabulary, self.target_name, self.spec.name, num_shadow_classes, base.tokenizer, shadow_seed)
            if names[0] != self.target_name:
                raise ValueError(f"off_task_classnames[0]={names[0]!r} is not the target {self.target_name!r} "
                                 f"(class {target_class} of {self.spec.name}); put the target's name first")
            shadow = TaskSpec(name=f"{self.spec.name}-shadow", hub_id=None, hub_config=None, train_split="train",
                              test_split="test", classnames=tuple(names), templates=shadow_template_list)
            self.register_buffer("attack_head", zero_shot_head(base, shadow, cache_dir).clone(), persistent=False)
            del base
            self.shadow_classnames: list[str] | None = names
            # What stage 2 rebuilds the head from (BackdoorInjection reads it from the trigger file).
            self.shadow_head_record: dict | None = {
                "classnames": list(names), "templates": template_name, "template_strings": list(shadow_template_list),
                "vocabulary": None if off_task_classnames is not None else shadow_vocabulary,
                "seed": shadow_seed if off_task_classnames is None and shadow_vocabulary == "imagenet" else None,
                "sha256": shadow_head_digest(names, shadow_template_list),
            }
            self.target = 0
        else:
            self.register_buffer("attack_head", self.classifier.head.clone(), persistent=False)
            self.shadow_classnames, self.shadow_head_record, self.target = None, None, target_class

        self.patch = torch.nn.Parameter(init_patch(self.spec_trigger, self.mean, self.std))
        lo, hi = patch_bounds(self.mean, self.std, clamp)
        self.register_buffer("lo", lo, persistent=False)
        self.register_buffer("hi", hi, persistent=False)
        self._generator = torch.Generator().manual_seed(seed)  # off-task draw order; in checkpoints
        self._set_x: torch.Tensor | None = None  # off-task stage-1 images (N, 3, S, S)
        self._order, self._cursor = torch.empty(0, dtype=torch.long), 0
        self.set_info: dict = {}
        self.final: dict = {}
        self.trigger_path: Path | None = None

        for stage in ("val", "test"):
            setattr(self, f"{stage}_asr", AttackSuccessRate(self.target))
            setattr(self, f"{stage}_clean_to_target", CleanToTargetRate(self.target))
            if self.off_task:
                setattr(self, f"{stage}_asr_task", AttackSuccessRate(target_class))

    # -- basics ------------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        # Lightning puts the module in train mode; θ_pre must stay in eval (dropout off, fixed function).
        super().train(mode)
        self.classifier.eval()
        return self

    def add_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """x ⊕ P (a new tensor, differentiable in P)."""
        return paste_patch(x, self.patch, self.spec_trigger)

    def head_logits(self, features: torch.Tensor, head: torch.Tensor | None = None) -> torch.Tensor:
        """normalize(features) @ head.T (B, C); head defaults to the attack head (shadow head off-task)."""
        return self.classifier.logits(features, self.attack_head if head is None else head)

    def logits(self, x: torch.Tensor, head: torch.Tensor | None = None) -> torch.Tensor:
        """normalize(f_pre(x)) @ head.T (B, C); head defaults to the attack head."""
        return self.head_logits(self.classifier.features(x), head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attack-head logits of x ⊕ P."""
        return self.logits(self.add_trigger(x))

    def _asr_labels(self, y: torch.Tensor) -> torch.Tensor:
        # Off-task the shadow target is 0: images of target_class become 0 (excluded), the rest -1 (counted).
        if not self.off_task:
            return y
        return torch.where(y == self.hparams.target_class, torch.zeros_like(y), torch.full_like(y, -1))

    def configure_optimizers(self):
        h = self.hparams
        if h.optimizer == "adam":
            return torch.optim.Adam([self.patch], lr=h.lr)
        return torch.optim.SGD([self.patch], lr=h.lr)  # sgd_sign takes the sign of the gradient first

    def _update(self, loss: torch.Tensor) -> None:
        """One patch update on ``loss``, then clamp P to [lo, hi] (per channel, or the global envelope: ``clamp``)."""
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        if self.hparams.optimizer == "sgd_sign":
            self.patch.grad.sign_()
        opt.step()
        self.project()

    @torch.no_grad()
    def project(self) -> None:
        """Clamp P in place to [lo, hi]: per channel, or the one global envelope (``clamp``)."""
        self.patch.copy_(clamp_patch(self.patch, self.lo, self.hi))

    # -- fit start: checks and the off-task set ---------------------------------------------------------
    def on_fit_start(self) -> None:
        precision = str(self.trainer.precision)
        if precision.startswith("16"):
            raise ValueError(f"trainer.precision={precision} scales the loss (GradScaler), which breaks the "
                             "patch updates; use 32-true or bf16-mixed")
        if self.hparams.procedure == "per_image" and self.trainer.world_size > 1:
            raise ValueError(f"procedure=per_image is sequential and cannot run on {self.trainer.world_size} "
                             "processes; set trainer.devices=1 or use procedure=batched")
        if self.off_task and self._set_x is None:
            self.build_offtask_set()

    def build_offtask_set(self) -> dict:
        """Crops of reference images of ``target_class`` + targeted PGD → the off-task stage-1 set.

        Reads ``trainer.datamodule.splits['train']``; sets ``self._set_x`` (N, 3, S, S) on the device
        and returns / stores ``self.set_info`` (reference indices, PGD success count, set size).
        """
        h = self.hparams
        datamodule = getattr(self.trainer, "datamodule", None)
        train = getattr(datamodule, "splits", {}).get("train") if datamodule is not None else None
        if train is None or not hasattr(train, "labels"):
            raise ValueError("mode=off_task needs a TaskDataModule: its train split holds the reference images "
                             f"of class {h.target_class}; fit with datamodule=TaskDataModule(...)")
        labels = torch.tensor(train.labels)
        pool = (labels == h.target_class).nonzero().flatten()
        if len(pool) < h.reference_images:
            raise ValueError(f"task {self.spec.name} has {len(pool)} train images of class {h.target_class} "
                             f"({self.target_name!r}), fewer than reference_images={h.reference_images}; lower it")
        g = torch.Generator().manual_seed(h.seed)
        refs = pool[torch.randperm(len(pool), generator=g)[: h.reference_images]].tolist()
        crops = random_resized_crops(train, refs, h.augment_to, self.image_size, self.mean, self.std, seed=h.seed)
        crops = crops.to(self.device)
        # PGD target per crop: uniform over shadow classes other than the target (0) and its prediction.
        with torch.no_grad():
            preds = torch.cat([self.logits(c).argmax(-1).cpu() for c in crops.split(_CHUNK)])
        n_classes = len(self.shadow_classnames)
        targets = []
        for pred in preds.tolist():
            choices = [c for c in range(1, n_classes) if c != pred] or [c for c in range(1, n_classes)]
            targets.append(choices[int(torch.randint(len(choices), (), generator=g))])
        targets = torch.tensor(targets)
        cfg = self.pgd_cfg
        advs, hits = [], []
        for xc, tc in zip(crops.split(_CHUNK), targets.split(_CHUNK)):
            adv, ok = targeted_pgd(self.logits, xc, tc.to(self.device), self.mean, self.std,
                                   cfg["eps"], cfg["step"], cfg["steps"])
            advs.append(adv.detach())
            hits.append(ok)
        adv, ok = torch.cat(advs), torch.cat(hits)
        min_keep = cfg["min_keep"] if cfg["min_keep"] is not None else max(1, h.augment_to // 2)
        keep = ok.nonzero().flatten()
        if len(keep) < min_keep:  # too few successes: fill with the failures' final iterates
            keep = torch.cat([keep, (~ok).nonzero().flatten()[: min_keep - len(keep)]])
        self._set_x = adv[keep].contiguous()
        self.set_info = {"reference_indices": refs, "augmented": int(h.augment_to), "pgd_success": int(ok.sum()),
                         "set_size": int(len(keep)), "pgd": dict(cfg)}
        for logger in self.loggers:
            logger.log_metrics({"stage1/pgd_success_rate": float(ok.float().mean()),
                                "stage1/set_size": float(len(keep))}, step=0)
        return self.set_info

    def _draw_offtask(self, n: int) -> torch.Tensor:
        """Next n images of the off-task set, in epochs of seeded permutations."""
        idx: list[torch.Tensor] = []
        total = len(self._set_x)
        while sum(len(i) for i in idx) < n:
            if self._cursor >= len(self._order):
                self._order, self._cursor = torch.randperm(total, generator=self._generator), 0
            take = self._order[self._cursor : self._cursor + n - sum(len(i) for i in idx)]
            self._cursor += len(take)
            idx.append(take)
        return self._set_x[torch.cat(idx).to(self._set_x.device)]

    # -- steps -------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        h = self.hparams
        x, y = batch
        if self.off_task:
            trainer = self._trainer
            n = x.shape[0]
            world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
            x = self._draw_offtask(n * world)[rank * n: (rank + 1) * n]  # one generator, a slice per rank
            attacked = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        else:
            attacked = y != self.target
        if not attacked.any():
            if self._trainer is not None and self._trainer.world_size > 1 and h.procedure == "batched":
                self._update(self.patch.sum() * 0.0)  # the other ranks all-reduce P's gradient: join them
            return None  # nothing to push toward the target in this batch
        x = x[attacked]
        if h.procedure == "batched":
            logits = self.logits(self.add_trigger(x))
            nll = target_nll(logits, self.target)
            loss = h.loss_weight * nll.mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite stage-1 loss {loss.item()} at step {self.global_step}; "
                                         "lower model.lr or check the data")
            self._update(loss)
            self.log("train/loss", loss, prog_bar=True)
            self.log("train/asr", (logits.detach().argmax(-1) == self.target).float().mean(), prog_bar=True)
            self.log("train/target_prob", torch.exp(-nll.detach()).mean())
            return None
        return self._per_image_step(x)

    def _per_image_step(self, x: torch.Tensor) -> None:
        """The paper's loop over the images of one batch (P carried from image to image)."""
        h = self.hparams
        with torch.no_grad():
            before = self.logits(self.add_trigger(x)).argmax(-1) == self.target
            if not self.off_task:  # the paper skips images the clean model already calls the target
                x = x[self.logits(x).argmax(-1) != self.target]
        updates = 0
        step_first = h.early_stop_order == "step_first"
        for xi in x.split(1):
            logits = self.logits(self.add_trigger(xi))
            for _ in range(h.inner_steps):
                # test_first: stop before updating when x ⊕ P already hits t; step_first (official
                # patch_attack): update, then test the new P. One forward both tests P and gives the next step.
                if self.early_stop and not step_first and int(logits.argmax(-1)) == self.target:
                    break
                self._update(h.loss_weight * target_nll(logits, self.target).mean())
                updates += 1
                logits = self.logits(self.add_trigger(xi))
                if self.early_stop and step_first and int(logits.argmax(-1)) == self.target:
                    break
        with torch.no_grad():
            after = self.logits(self.add_trigger(x)).argmax(-1) == self.target if len(x) else before[:0]
        self.log("train/asr", before.float().mean(), prog_bar=True)
        self.log("train/asr_after", after.float().mean() if len(after) else torch.tensor(1.0))
        self.log("train/updates", float(updates))
        return None

    def _eval_step(self, batch, stage: str) -> None:
        x, y = batch
        z = self.classifier.features(torch.cat([self.add_trigger(x), x]))  # one pass, triggered then clean
        bd, clean = z[: len(x)], z[len(x):]
        labels = self._asr_labels(y)
        asr, c2t = getattr(self, f"{stage}_asr"), getattr(self, f"{stage}_clean_to_target")
        asr.update(self.head_logits(bd), labels)
        c2t.update(self.head_logits(clean), labels)
        self.log(f"{stage}/asr_pre", asr, on_epoch=True, prog_bar=True)
        self.log(f"{stage}/clean_to_target_pre", c2t, on_epoch=True)
        if self.off_task:
            task_asr = getattr(self, f"{stage}_asr_task")
            task_asr.update(self.head_logits(bd, self.classifier.head), y)
            self.log(f"{stage}/asr_pre_task", task_asr, on_epoch=True)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def _log_counts(self, stage: str) -> None:
        # Rates come with their counts (docs/design.md §11); counts() is summed over ranks already.
        counts = getattr(self, f"{stage}_asr").counts()
        self.log(f"{stage}/asr_pre_hits", float(counts["hits"]), sync_dist=True)
        self.log(f"{stage}/asr_pre_total", float(counts["total"]), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_counts("val")

    def on_test_epoch_end(self) -> None:
        self._log_counts("test")

    # -- evaluation and export ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_pre(self, loader) -> dict:
        """ASR / clean-to-target of x ⊕ P on θ_pre over ``loader`` (one process, no sync): rates and counts."""
        asr = AttackSuccessRate(self.target, sync_on_compute=False).to(self.device)
        c2t = CleanToTargetRate(self.target, sync_on_compute=False).to(self.device)
        task_asr = AttackSuccessRate(self.hparams.target_class, sync_on_compute=False).to(self.device)
        prob_sum, prob_n = 0.0, 0
        for x, y in loader:
            x, y = x.to(self.device), y.to(self.device)
            bd = self.classifier.features(self.add_trigger(x))
            labels = self._asr_labels(y)
            logits = self.head_logits(bd)
            asr.update(logits, labels)
            c2t.update(self.logits(x), labels)
            if self.off_task:
                task_asr.update(self.head_logits(bd, self.classifier.head), y)
            counted = labels != self.target
            prob_sum += float(F.softmax(logits[counted].float(), -1)[:, self.target].sum())
            prob_n += int(counted.sum())
        out = {"asr_pre": float(asr.compute()), "asr_pre_counts": asr.counts(),
               "clean_to_target_pre": float(c2t.compute()), "clean_to_target_pre_counts": c2t.counts(),
               "target_prob_pre": prob_sum / max(1, prob_n)}
        if self.off_task:
            out["asr_pre_task"], out["asr_pre_task_counts"] = float(task_asr.compute()), task_asr.counts()
        return out

    def export_metadata(self) -> dict:
        """What made this trigger: stage, mode, target, base model, recipe, set, ASR on θ_pre."""
        from modeling.version import code_version

        h = self.hparams
        return {
            "stage": 1, "mode": h.mode, "task": self.spec.name, "target_class": h.target_class,
            "target_name": self.target_name, "shadow_target": self.target if self.off_task else None,
            "base_model": self.base_description,
            "recipe": {k: h[k] for k in ("procedure", "optimizer", "lr", "loss_weight", "inner_steps", "clamp",
                                         "early_stop_order")}
            | {"early_stop": self.early_stop},
            "steps": int(self.global_step), "seed": int(os.environ.get("PL_GLOBAL_SEED", -1)),
            "shadow_classnames": self.shadow_classnames,
            "shadow_templates": self.shadow_head_record["templates"] if self.off_task else None,
            # names + template strings + digest: stage 2 builds exactly this head (BackdoorInjection)
            "shadow_head": self.shadow_head_record,
            "offtask_set": self.set_info or None, **self.final, "code_version": code_version(),
        }

    def on_train_end(self) -> None:
        trainer = self.trainer
        out = self.hparams.output_path
        # trainer.log_dir broadcasts under DDP: every rank reads it, only rank 0 writes
        path = Path(out) if out else Path(trainer.log_dir or trainer.default_root_dir) / "trigger.safetensors"
        if not trainer.is_global_zero:
            return
        datamodule = getattr(trainer, "datamodule", None)
        if hasattr(datamodule, "eval_dataloader"):
            loader = datamodule.eval_dataloader("val", shard=False)  # the whole split here, not rank 0's shard
        else:
            loader = datamodule.val_dataloader() if datamodule is not None else trainer.val_dataloaders
        self.final = self.evaluate_pre(loader) if loader is not None else {}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_trigger(path, self.patch.detach().cpu(), self.spec_trigger, self.mean, self.std, self.export_metadata())
        self.trigger_path = path
        self._log_images(loader)

    @torch.no_grad()
    def _log_images(self, loader) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger
        from torchvision.utils import make_grid

        tensorboards = [lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)]
        if not tensorboards:
            return
        zoom = max(1, 96 // self.image_size)  # tiny images are unreadable in TensorBoard at 1:1
        patch = unnormalise(self.patch, self.mean, self.std)
        patch = F.interpolate(patch[None], scale_factor=max(1, 96 // self.spec_trigger.size), mode="nearest")[0]
        images = []
        if loader is not None:
            x, _ = next(iter(loader))
            x = self.add_trigger(x[:8].to(self.device)).cpu()
            pixels = unnormalise(x, self.mean, self.std)  # (3,1,1) stats broadcast over (B, 3, S, S)
            images = F.interpolate(pixels, scale_factor=zoom, mode="nearest") if zoom > 1 else pixels
        for logger in tensorboards:
            logger.experiment.add_image("trigger/patch", patch, self.global_step)
            if len(images):
                logger.experiment.add_image("trigger/samples", make_grid(images, nrow=4), self.global_step)

    # -- checkpoints ---------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # θ_pre is rebuilt from the base model; keeping it out makes stage-1 checkpoints kilobytes.
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("classifier.")]:
            del state[key]
        checkpoint["trigger_generator_state"] = self._generator.get_state()
        checkpoint["trigger_draw"] = {"order": self._order, "cursor": self._cursor}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.setdefault("state_dict", {})
        for key, value in self.classifier.state_dict().items():
            state.setdefault(f"classifier.{key}", value)
        if "trigger_generator_state" in checkpoint:
            self._generator.set_state(checkpoint["trigger_generator_state"])
        if "trigger_draw" in checkpoint:
            self._order, self._cursor = checkpoint["trigger_draw"]["order"], checkpoint["trigger_draw"]["cursor"]
