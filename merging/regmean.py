"""RegMean (Jin et al., ICLR 2023): merge linear layers by least squares on their inputs' Gram matrices.

For a linear weight W (out, in) with y = x Wᵀ, model t and its Gram matrix G_t = Σ XᵀX (in, in) over
the layer's input rows X of task t:

    G̃_t = α·G_t + (1 − α)·diag(G_t)          (off-diagonal scaled by α; docs/design.md §9: α = 0.1)
    W_mergedᵀ = (Σ_t G̃_t)⁻¹ Σ_t G̃_t W_tᵀ

With α = 1 this minimises Σ_t ||X_t W_mergedᵀ − X_t W_tᵀ||²; with α = 0 it is a per-input-feature
weighted mean. Every other float tensor (biases, norms, embeddings, conv) is averaged:
θ_pre + c·Σ_t τ_t with c = 1/n. Pure torch; nothing here imports Lightning or the project.

Workflow: for each fine-tuned model t, load θ_t into the encoder and call
``linear_input_grams(encoder, a few train batches of task t)``; then
``regmean_merge(θ_pre, [θ_t], [grams_t])``.
"""

from __future__ import annotations

import inspect
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .io import MergeInputError
from .task_vectors import compute_dtype, is_mergeable, task_vector

__all__ = ["GramDict", "linear_input_grams", "regmean_merge"]

StateDict = Mapping[str, torch.Tensor]


class GramDict(dict):
    """``{weight key: G (in, in) float32 on CPU}`` with ``rows[key]``: the number of input rows summed.

    Grams are sums, not means: tasks that saw more rows weigh more in ``regmean_merge``. To weigh
    tasks equally whatever their data size, divide each G by ``rows[key]`` first.
    """

    def __init__(self, *args, rows: dict[str, int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows: dict[str, int] = dict(rows or {})


# ---------------------------------------------------------------------------------------------
# Gram matrices from forward hooks
# ---------------------------------------------------------------------------------------------
_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _attention_output_before_projection(module: nn.MultiheadAttention, arguments: dict) -> torch.Tensor:
    """The input of ``module.out_proj``: the concatenated heads softmax(QKᵀ/√d)V, (..., embed_dim).

    nn.MultiheadAttention applies out_proj through F.multi_head_attention_forward, never by calling
    the out_proj module, so a hook on out_proj does not fire. Re-running the functional attention
    with an identity output projection yields exactly that input (attention dropout off, as in eval).
    """
    query, key, value = arguments["query"], arguments["key"], arguments["value"]
    batched = query.dim() == 3
    if module.batch_first and batched:  # the functional form wants (L, N, E)
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    weight = module.out_proj.weight
    identity = torch.eye(module.embed_dim, dtype=weight.dtype, device=weight.device)
    separate = not module._qkv_same_embed_dim
    output, _ = F.multi_head_attention_forward(
        query, key, value, module.embed_dim, module.num_heads,
        module.in_proj_weight, module.in_proj_bias, module.bias_k, module.bias_v, module.add_zero_attn,
        0.0, identity, torch.zeros_like(identity[0]),
        training=False, key_padding_mask=arguments["key_padding_mask"], need_weights=False,
        attn_mask=arguments["attn_mask"], use_separate_proj_weight=separate,
        q_proj_weight=module.q_proj_weight, k_proj_weight=module.k_proj_weight,
        v_proj_weight=module.v_proj_weight, is_causal=arguments["is_causal"],
    )
    return output  # layout is irrelevant: rows are flattened


@torch.no_grad()
def linear_input_grams(encoder: nn.Module, batches: Iterable[torch.Tensor],
                       layer_names: list[str] | None = None) -> GramDict:
    """G[key] = Σ XᵀX (in, in) of the input rows X (N, in) of every linear weight, over ``batches``.

    Covered weights, keyed by state-dict key (e.g. ``transformer.resblocks.0.mlp.c_fc.weight``):

    - every ``nn.Linear`` called as a module (its input, all leading dims flattened to rows);
    - ``nn.MultiheadAttention``: ``in_proj_weight`` (input = the attention input, when query, key
      and value are the same tensor, as in self-attention; cross-attention is skipped), or
      ``q/k/v_proj_weight`` with their own inputs; and ``out_proj.weight`` (input = the heads'
      concatenated output, recomputed, see ``_attention_output_before_projection``);
    - a non-MHA module owning an ``in_proj_weight`` (open_clip's custom ``Attention``): its first
      positional input.

    Not covered (so averaged by ``regmean_merge``): convolutions (``conv1``), ``proj`` and other
    bare matrix parameters, embeddings, norms. ``layer_names`` restricts to the given weight keys or
    module names. Each batch is a tensor, or a (x, y, ...) tuple whose first item is the input; it is
    moved to the encoder's device. The encoder runs in eval mode (no dropout), then its mode is
    restored. Accumulated in float64 on the batch's device; returned float32 on CPU with row counts.
    """
    wanted = None if layer_names is None else set(layer_names)
    plans, candidates = _hook_plans(encoder)
    if wanted is not None:
        for entry in sorted(wanted):
            if entry not in candidates and not any(c.rsplit(".", 1)[0] == entry for c in candidates):
                raise MergeInputError(f"layer_names entry {entry!r} matches no linear weight of the encoder; "
                                      f"use a weight key such as {sorted(candidates)[:1]} or its module name")
    grams = _GramAccumulator(wanted)
    handles = []
    for kind, module, prefix in plans:
        if kind == "mha":
            handles.append(module.register_forward_hook(grams.mha_hook(prefix), with_kwargs=True))
        elif grams.selected(key := _join(prefix, "in_proj_weight" if kind == "in_proj" else "weight")):
            handles.append(module.register_forward_pre_hook(grams.linear_hook(key)))

    was_training = encoder.training
    device = next((p.device for p in encoder.parameters()), torch.device("cpu"))
    encoder.eval()
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            encoder(x.to(device))
    finally:
        for handle in handles:
            handle.remove()
        encoder.train(was_training)
    if not grams.sums:
        raise MergeInputError("linear_input_grams saw no linear inputs; pass non-empty batches and an encoder "
                              "with nn.Linear / attention layers")
    return GramDict({k: grams.sums[k].to(torch.float32).cpu() for k in sorted(grams.sums)}, rows=grams.rows)


def _hook_plans(encoder: nn.Module) -> tuple[list[tuple[str, nn.Module, str]], set[str]]:
    """(kind, module, prefix) of every module whose linear inputs are recorded, and the weight keys covered."""
    candidates: set[str] = set()
    plans = []
    inside_mha: set[int] = set()
    for name, module in encoder.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            inside_mha.add(id(module.out_proj))
            plans.append(("mha", module, name))
            if module._qkv_same_embed_dim:
                candidates.add(_join(name, "in_proj_weight"))
            else:
                candidates.update(_join(name, n) for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight"))
            candidates.add(_join(name, "out_proj.weight"))
        elif isinstance(getattr(module, "in_proj_weight", None), nn.Parameter) and module.in_proj_weight.dim() == 2:
            plans.append(("in_proj", module, name))
            candidates.add(_join(name, "in_proj_weight"))
    for name, module in encoder.named_modules():
        if isinstance(module, nn.Linear) and id(module) not in inside_mha:
            plans.append(("linear", module, name))
            candidates.add(_join(name, "weight"))
    return plans, candidates


class _GramAccumulator:
    """Σ XᵀX (float64) and row counts per weight key, fed by forward hooks."""

    def __init__(self, wanted: set[str] | None):
        self.wanted = wanted
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}

    def add(self, key: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        gram = x.T @ x
        self.sums[key] = self.sums[key] + gram if key in self.sums else gram
        self.rows[key] = self.rows.get(key, 0) + x.shape[0]

    def selected(self, key: str) -> bool:
        return self.wanted is None or key in self.wanted or key.rsplit(".", 1)[0] in self.wanted

    def linear_hook(self, key: str):
        def hook(module, args):
            self.add(key, args[0])
        return hook

    def mha_hook(self, prefix: str):
        def hook(module, args, kwargs, output):
            bound = _MHA_SIGNATURE.bind(module, *args, **kwargs)
            bound.apply_defaults()
            arguments = bound.arguments
            query, key, value = arguments["query"], arguments["key"], arguments["value"]
            if module._qkv_same_embed_dim:
                if query is key and key is value and self.selected(_join(prefix, "in_proj_weight")):
                    self.add(_join(prefix, "in_proj_weight"), query)
            else:
                for name, x in (("q_proj_weight", query), ("k_proj_weight", key), ("v_proj_weight", value)):
                    if self.selected(_join(prefix, name)):
                        self.add(_join(prefix, name), x)
            out_key = _join(prefix, "out_proj.weight")
            if self.selected(out_key):
                self.add(out_key, _attention_output_before_projection(module, arguments))
        return hook


# ---------------------------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------------------------
def _solve(a: torch.Tensor, b: torch.Tensor, average: torch.Tensor) -> torch.Tensor:
    """X = A⁻¹B (float64); for a singular A, the solution of AX = B nearest to ``average``.

    B lies in range(A) (B = Σ G̃_t W_tᵀ and every G̃_t is PSD), so X = avg + A⁺(B − A·avg) solves AX = B
    exactly while unobserved input directions keep the plain average instead of becoming 0.
    """
    solution, info = torch.linalg.solve_ex(a, b)
    if int(info) == 0 and bool(torch.isfinite(solution).all()):
        residual = torch.linalg.matrix_norm(a @ solution - b) / torch.linalg.matrix_norm(b).clamp_min(1e-300)
        if residual < 1e-8:
            return solution
    return average + torch.linalg.pinv(a, hermitian=True) @ (b - a @ average)


def _other_coefficient(value, n: int) -> float:
    if isinstance(value, str):
        if value != "average":
            raise MergeInputError(f"regmean: coefficient_other={value!r} must be 'average' or a number")
        return 1.0 / n
    try:
        return float(value)
    except (TypeError, ValueError):
        raise MergeInputError(f"regmean: coefficient_other={value!r} must be 'average' or a number") from None


def regmean_merge(pretrained: StateDict, finetuned: Sequence[StateDict], grams: Sequence[Mapping[str, torch.Tensor]],
                  alpha: float = 0.1, coefficient_other: str | float = "average") -> dict[str, torch.Tensor]:
    """RegMean over full fine-tuned state dicts θ_t (not task vectors), one Gram dict per model.

    Weights (out, in) with a Gram (in, in) in every ``grams[t]``: W = ((Σ G̃_t)⁻¹ Σ G̃_t W_tᵀ)ᵀ, see the
    module docstring. Other float tensors: θ_pre + c·Σ_t τ_t, c = 1/n for ``"average"`` (the mean of
    the θ_t) or the given number (Task Arithmetic). Non-float tensors are copied from ``pretrained``.
    Results keep pretrained's dtypes, on CPU. Solves run in float64.
    """
    if not isinstance(finetuned, (list, tuple)) or not finetuned:
        raise MergeInputError("regmean: need a non-empty list of fine-tuned state dicts")
    if not isinstance(grams, (list, tuple)) or len(grams) != len(finetuned):
        raise MergeInputError(f"regmean: got {len(finetuned)} fine-tuned models but "
                              f"{len(grams) if isinstance(grams, (list, tuple)) else 'no list of'} Gram dicts; "
                              "pass one linear_input_grams result per model")
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise MergeInputError(f"regmean: alpha={alpha!r} must be a number in [0, 1]") from None
    if not 0.0 <= alpha <= 1.0:
        raise MergeInputError(f"regmean: alpha={alpha!r} must lie in [0, 1] (off-diagonal scale of the Grams)")
    n = len(finetuned)
    other = _other_coefficient(coefficient_other, n)

    vectors = []
    for index, model in enumerate(finetuned):
        try:
            vectors.append(task_vector(model, pretrained))
        except MergeInputError as error:
            raise MergeInputError(f"fine-tuned model {index}: {error}") from None

    for index, model_grams in enumerate(grams):
        for key, gram in model_grams.items():
            base = pretrained.get(key)
            if base is None:
                raise MergeInputError(f"Gram dict {index} has key {key!r} absent from the pre-trained state dict; "
                                      "compute Grams on the same architecture")
            if not is_mergeable(base) or base.dim() != 2:
                raise MergeInputError(f"Gram dict {index}, key {key!r}: weight is not a 2-D float matrix "
                                      f"(shape {tuple(base.shape)}); only linear weights take Grams")
            d_in = base.shape[1]
            if tuple(gram.shape) != (d_in, d_in):
                raise MergeInputError(f"Gram dict {index}, key {key!r}: shape {tuple(gram.shape)} != ({d_in}, {d_in}) "
                                      "for a weight (out, in); recompute it with linear_input_grams")
            if not bool(torch.isfinite(gram).all()):
                raise MergeInputError(f"Gram dict {index}, key {key!r}: contains NaN or inf; check the inputs")
    regmean_keys = set(grams[0]).intersection(*grams[1:])  # a key missing from any model is averaged

    merged: dict[str, torch.Tensor] = {}
    for key, base in pretrained.items():
        if not is_mergeable(base):
            merged[key] = base.detach().cpu().clone()
            continue
        if key in regmean_keys:
            a = torch.zeros(base.shape[1], base.shape[1], dtype=torch.float64)
            b = torch.zeros(base.shape[1], base.shape[0], dtype=torch.float64)
            for model, model_grams in zip(finetuned, grams):
                gram = model_grams[key].detach().cpu().to(torch.float64)
                reduced = alpha * gram + (1.0 - alpha) * torch.diag(torch.diagonal(gram))
                a += reduced
                b += reduced @ model[key].detach().cpu().to(torch.float64).T
            average = torch.stack([m[key].detach().cpu().to(torch.float64) for m in finetuned]).mean(0).T
            merged[key] = _solve(a, b, average).T.contiguous().to(base.dtype)
            continue
        dtype = compute_dtype(base.dtype, *(v[key].dtype for v in vectors))
        total = torch.stack([v[key].detach().cpu().to(dtype) for v in vectors]).sum(0)
        merged[key] = (base.detach().cpu().to(dtype) + other * total).to(base.dtype)
    return merged
