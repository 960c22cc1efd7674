"""DAM, Defense-Aware Merging (Yang et al., ICLR 2025, arXiv 2410.13910; code: Yangjinluan/DAM on FusionBench,
``method/concrete_subspace/clip_safe_concrete_adamerging.py``): a safety-aware concrete mask on task vectors.

A mask m (one entry per weight, shared by every task vector) scales the merged task vector δ = θ_merged − θ_pre:

    θ(m) = θ_pre + m ⊙ δ,   m_k = c_k / mean(c_k),   c_k = σ((ℓ_k + log u − log(1 − u)) / T),  u ~ U(0, 1)

(c_k: a relaxed-Bernoulli sample of the logits ℓ_k at temperature T, per tensor k). For Task Arithmetic
θ_pre + λ·Σ_t m ⊙ τ_t = θ_pre + m ⊙ δ: masking the merge is DAM's shared mask on every task vector.

Each step draws fresh unlabeled batches x_t (B, 3, S, S) of every task t and, with f = the encoder + zero-shot head of t:

    1. P_t (3, S, S), one perturbation per task, ascends Σ_t CE(f_θ(m)(x_t + P_t), argmax f_θ(m)(x_t))
       (m detached; Adam, ``adv_lr``) — a stand-in for an unknown trigger;
    2. ℓ descends Σ_t H(f_θ(m)(x'_t)) + w·H(f_θ(m)(clamp(x'_t + P_t)))  (P fixed; Adam, ``lr``), H = entropy.

After ``steps``: θ_defended = θ_pre + m ⊙ δ with one more sample m (``eval_mask`` continuous, the code's default,
or discrete: a Bernoulli draw, rescaled alike). Defaults are the code's (``clip_safe_concrete_task_arithmetic.yaml``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["apply_mask", "concrete_sample", "dam_defend", "entropy", "rescaled_mask", "train_dam_mask"]

StateDict = dict[str, torch.Tensor]
#: forward(params, images per task) -> logits per task, one (B_t, C_t) each
Forward = Callable[[StateDict, Sequence[torch.Tensor]], Sequence[torch.Tensor]]


def concrete_sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A reparameterised RelaxedBernoulli(logits, T) sample: σ((logit(p) + log u − log(1 − u)) / T), with
    torch.distributions' clamps (p and u to [eps, 1 − eps], the output to [tiny, 1 − eps])."""
    finfo = torch.finfo(logits.dtype)
    u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype, device=logits.device)
    u = u.clamp(finfo.eps, 1 - finfo.eps)
    p = torch.sigmoid(logits).clamp(finfo.eps, 1 - finfo.eps)
    z = (u.log() - (-u).log1p() + p.log() - (-p).log1p()) / temperature
    return torch.sigmoid(z).clamp(finfo.tiny, 1 - finfo.eps)


def rescaled_mask(logits: StateDict, temperature: float, generator: torch.Generator | None = None,
                  kind: str = "continuous") -> StateDict:
    """m_k = c_k / mean(c_k) per tensor: c_k a concrete sample (``continuous``) or a Bernoulli draw (``discrete``)."""
    mask = {}
    for key, logit in logits.items():
        if kind == "continuous":
            c = concrete_sample(logit, temperature, generator)
        elif kind == "discrete":
            c = torch.bernoulli(torch.sigmoid(logit), generator=generator)
        else:
            raise ValueError(f"mask kind {kind!r} must be 'continuous' or 'discrete'")
        mask[key] = c / c.mean()
    return mask


def apply_mask(theta_pre: StateDict, merged: StateDict, mask: StateDict) -> StateDict:
    """θ_pre + m ⊙ (θ_merged − θ_pre) on the masked keys (in float32, back to ``merged``'s dtypes), others copied."""
    out = {}
    for key, value in merged.items():
        if key in mask:
            pre = theta_pre[key].float()
            m = mask[key].detach().to(pre.device)
            out[key] = (pre + m * (value.float() - pre)).to(value.dtype)
        else:
            out[key] = value.clone()
    return out


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of H(softmax(logits (B, C))) = −Σ_c p_c log p_c."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean()


def train_dam_mask(theta_pre: StateDict, merged: StateDict, forward: Forward, next_batch: Callable[[int], torch.Tensor],
                   n_tasks: int, image_shape: Sequence[int], *, adv_weight: float = 0.1, steps: int = 2000,
                   lr: float = 1e-3, adv_lr: float = 1e-4, temperature: float = 0.5, initial_logits: float = 0.0,
                   bounds: tuple = (0.0, 1.0), generator: torch.Generator | None = None,
                   device: str | torch.device = "cpu") -> tuple[StateDict, torch.Tensor]:
    """(mask logits ℓ {key: tensor}, perturbations P (n_tasks, *image_shape)) after ``steps`` DAM steps.

    ``merged``'s float keys are masked. ``next_batch(t)``: a fresh unlabeled batch of task t (its images only);
    ``bounds``: (lo, hi) the perturbed images of step 2 are clamped to (numbers or tensors broadcasting to them).
    """
    keys = [k for k, v in merged.items() if v.is_floating_point()]
    pre = {k: theta_pre[k].to(device, torch.float32) for k in keys}
    delta = {k: merged[k].to(device, torch.float32) - pre[k] for k in keys}
    logits = {k: torch.full_like(pre[k], float(initial_logits), requires_grad=True) for k in keys}
    perturbation = torch.zeros((n_tasks, *image_shape), device=device, requires_grad=True)
    mask_opt = torch.optim.Adam(list(logits.values()), lr=lr)
    adv_opt = torch.optim.Adam([perturbation], lr=adv_lr)
    lo, hi = (torch.as_tensor(b, dtype=torch.float32, device=device) for b in bounds)

    for _ in range(steps):
        mask = rescaled_mask(logits, temperature, generator)
        params = {k: pre[k] + mask[k] * delta[k] for k in keys}

        # 1. the perturbations ascend the cross-entropy to the clean predictions (the mask is fixed)
        fixed = {k: v.detach() for k, v in params.items()}
        xs = [next_batch(t).to(device) for t in range(n_tasks)]
        outs = forward(fixed, [torch.cat([x, x + perturbation[t]]) for t, x in enumerate(xs)])
        loss = sum(-F.cross_entropy(o[len(x):], o[:len(x)].argmax(1)) for o, x in zip(outs, xs))
        adv_opt.zero_grad()
        loss.backward()
        adv_opt.step()

        # 2. the mask descends the entropy on clean and (weighted by w) perturbed images (P fixed)
        with torch.no_grad():
            xs = [next_batch(t).to(device) for t in range(n_tasks)]
            views = [torch.cat([x, torch.maximum(torch.minimum(x + perturbation[t], hi), lo)]) for t, x in enumerate(xs)]
        outs = forward(params, views)
        loss = sum(entropy(o[:len(x)]) + adv_weight * entropy(o[len(x):]) for o, x in zip(outs, xs))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"DAM: non-finite loss {loss.item()}; check the merged weights and the data")
        mask_opt.zero_grad()
        loss.backward()
        mask_opt.step()
    return {k: v.detach() for k, v in logits.items()}, perturbation.detach()


def dam_defend(theta_pre: StateDict, merged: StateDict, forward: Forward, next_batch: Callable[[int], torch.Tensor],
               n_tasks: int, image_shape: Sequence[int], *, eval_mask: str = "continuous", temperature: float = 0.5,
               generator: torch.Generator | None = None, **train) -> StateDict:
    """θ_pre + m ⊙ (θ_merged − θ_pre): ``train_dam_mask``, then one ``eval_mask`` sample of the learned logits."""
    logits, _ = train_dam_mask(theta_pre, merged, forward, next_batch, n_tasks, image_shape, temperature=temperature,
                               generator=generator, **train)
    with torch.no_grad():
        mask = rescaled_mask(logits, temperature, generator, eval_mask)
    defended = apply_mask(theta_pre, merged, {k: m.cpu() for k, m in mask.items()})
    return {k: v.cpu() for k, v in defended.items()}
