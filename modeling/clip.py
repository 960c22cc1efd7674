"""open_clip models by name, the embedded base model, and frozen zero-shot heads.

A base model is named by ``(model_name, pretrained)``:

- ``("ViT-B-32", "openai")``: an open_clip model with a pretrained tag (paper scale; needs the hub or
  open_clip's cache);
- ``("ViT-B-32", "/path/weights.safetensors" | "/path/open_clip.bin")``: local weights;
- ``("badmerging-tiny", None)``: the embedded base model shipped in ``modeling/weights/``, a
  project-registered open_clip config with a compact tokenizer (see ``modeling/tokenizer.py``).

Only the image encoder (``model.visual``) is ever trained, exported, or merged. The text tower is used
once per task to build its zero-shot head, which is then frozen and cached.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

CONFIG_DIR = Path(__file__).parent / "model_configs"
WEIGHTS_DIR = Path(__file__).parent / "weights"
EMBEDDED_MODEL = "badmerging-tiny"
EMBEDDED_WEIGHTS = WEIGHTS_DIR / f"{EMBEDDED_MODEL}.safetensors"

open_clip.add_model_config(CONFIG_DIR)


class ModelLoadError(ValueError):
    """A base model that cannot be created or loaded; the message names the input and the fix."""


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class BaseModel:
    """A loaded CLIP model with what is needed to use it: transforms, tokenizer, identity."""

    name: str
    pretrained: str | None
    model: nn.Module
    preprocess: object  # torchvision transform: PIL image -> normalised tensor
    tokenizer: object  # texts -> LongTensor (n, context_length)
    base_id: str  # stable identity of the weights, recorded in every artifact made from them
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """θ_pre: the image encoder's state dict, detached copies."""
        return {k: v.detach().clone() for k, v in self.model.visual.state_dict().items()}

    def describe(self) -> dict:
        return {"model_name": self.name, "pretrained": self.pretrained, "base_id": self.base_id}


def _create_without_weights(name: str, device: str) -> nn.Module:
    """open_clip.create_model with no weights, without its 'initialized randomly' warning: we load next."""
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        return open_clip.create_model(name, pretrained=None, device=device)
    finally:
        root.setLevel(level)


def embedded_tokenizer(meta: dict):
    from modeling.tokenizer import CompactTokenizer

    return CompactTokenizer(meta["bpe_ids"], context_length=meta.get("context_length", 32))


def read_safetensors_metadata(path: Path) -> dict:
    """The project's JSON metadata in a safetensors header ({} if none)."""
    from merging.io import read_header_metadata

    meta = read_header_metadata(path)
    return meta if isinstance(meta, dict) else {}


def _load_local_weights(path: Path, device: str) -> tuple[dict, dict]:
    """(state dict, metadata) of a local weights file, never running code from it.

    ``.safetensors`` goes through ``merging.io`` (pickles refused before parsing, header bounds
    checked); anything else is an open_clip / torch checkpoint read with ``torch.load(weights_only=True)``,
    which only rebuilds tensors and plain containers.
    """
    from merging.io import MergeInputError, load_state_dict

    if path.suffix == ".safetensors":
        try:
            return load_state_dict(path, device=device), read_safetensors_metadata(path)
        except MergeInputError as e:
            raise ModelLoadError(f"weights {e}") from None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise ModelLoadError(f"weights file {path} holds Python objects other than tensors; refused (unpickling could "
                             "run code): convert it to .safetensors with trusted code") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"weights file {path} is not a readable torch checkpoint ({first}); check or re-download "
                             "it") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ModelLoadError(f"weights file {path} is not a state dict of tensors; pass an open_clip checkpoint or "
                             ".safetensors file")
    return {k.removeprefix("module."): v for k, v in state.items()}, {}


def _create_with_tag(name: str, pretrained: str | None, device: str) -> nn.Module:
    """open_clip.create_model with a pretrained tag, asking open_clip for weights-only loading where it offers it."""
    kwargs = {}
    if "weights_only" in inspect.signature(open_clip.create_model).parameters:
        kwargs["weights_only"] = True
    return open_clip.create_model(name, pretrained=pretrained, device=device, **kwargs)


def load_base_model(name: str = EMBEDDED_MODEL, pretrained: str | None = None, device: str = "cpu") -> BaseModel:
    """Create an open_clip model and load its weights (safetensors or weights-only torch files)."""
    if name == EMBEDDED_MODEL and pretrained is None:
        pretrained = str(EMBEDDED_WEIGHTS)
        if not EMBEDDED_WEIGHTS.exists():
            raise ModelLoadError(
                f"embedded base weights {EMBEDDED_WEIGHTS} are missing; rebuild them with "
                "`python -m modeling.pretrain --out modeling/weights/badmerging-tiny.safetensors`"
            )
    if name not in open_clip.list_models():
        raise ModelLoadError(f"unknown model {name!r}; use an open_clip name such as ViT-B-32 or {EMBEDDED_MODEL}")
    meta: dict = {}
    is_local = pretrained is not None and (os.sep in pretrained or os.path.exists(pretrained)
                                           or pretrained.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt")))
    try:
        if is_local:
            path = Path(pretrained)
            if path.is_dir():
                raise ModelLoadError(f"weights path {path} is a directory; pass the weights file in it "
                                     "(merge.py --pretrained, train.py --model.init_args.pretrained)")
            if not path.is_file():
                raise ModelLoadError(f"weights file {path} does not exist; pass an existing weights file "
                                     "(merge.py --pretrained, train.py --model.init_args.pretrained)")
            model = _create_without_weights(name, device)
            state, meta = _load_local_weights(path, device)
            missing, unexpected = model.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ModelLoadError(
                    f"weights {path} do not fit model {name}: missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}; "
                    "check that --model_name matches the file"
                )
            base_id = f"{name}@sha256:{_sha256(path)[:16]}"
        else:
            model = _create_with_tag(name, pretrained, device)
            base_id = f"{name}@{pretrained}"
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - turn library errors into one actionable line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load {name} with pretrained={pretrained!r}: {first}") from e
    model.eval()
    vcfg = model.visual
    image_size = vcfg.image_size[0] if isinstance(vcfg.image_size, (tuple, list)) else int(vcfg.image_size)
    mean = tuple(getattr(vcfg, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(getattr(vcfg, "image_std", None) or open_clip.OPENAI_DATASET_STD)
    preprocess = open_clip.image_transform(image_size, is_train=False, mean=mean, std=std)
    if name == EMBEDDED_MODEL and "bpe_ids" not in meta:
        # weights without the project's metadata (an open_clip .bin/.pt): the vocabulary is the shipped one's
        if EMBEDDED_WEIGHTS.exists():
            meta = {**read_safetensors_metadata(EMBEDDED_WEIGHTS), **meta}
        if "bpe_ids" not in meta:
            raise ModelLoadError(f"weights {pretrained} carry no tokenizer vocabulary (bpe_ids) for {name}; pass the "
                                 "safetensors file written by modeling.pretrain")
    tokenizer = embedded_tokenizer(meta) if name == EMBEDDED_MODEL else open_clip.get_tokenizer(name)
    return BaseModel(name, pretrained, model, preprocess, tokenizer, base_id, mean, std, image_size)


@torch.no_grad()
def build_zero_shot_head(model: nn.Module, tokenizer, classnames, templates, batch_size: int = 256) -> torch.Tensor:
    """Zero-shot head (C, D): per class, mean of L2-normalised text embeddings over templates,
    re-normalised, times ``logit_scale.exp()``. Logits = normalize(f(x)) @ head.T, no bias."""
    device = next(model.parameters()).device
    rows = []
    for name in classnames:
        texts = [t.format(name) for t in templates]
        emb = torch.cat([model.encode_text(tokenizer(texts[i : i + batch_size]).to(device)) for i in range(0, len(texts), batch_size)])
        emb = F.normalize(emb.float(), dim=-1).mean(0)
        rows.append(F.normalize(emb, dim=-1))
    return torch.stack(rows) * model.logit_scale.exp().float()


def zero_shot_head(base: BaseModel, task, cache_dir: str | Path | None = None) -> torch.Tensor:
    """The frozen head of ``task`` (a TaskSpec) for ``base``, cached per (base_id, task) as safetensors."""
    from modeling.tokenizer import check_task_texts

    check_task_texts(base.tokenizer, task)  # no class names, or words the embedded vocabulary lacks: refused
    path = None
    if cache_dir is not None:
        key = hashlib.sha256(json.dumps([base.base_id, task.name, list(task.classnames), list(task.templates)]).encode()).hexdigest()[:16]
        path = Path(cache_dir) / "heads" / f"{task.name}-{key}.safetensors"
        if path.exists():
            cached = _read_cached_head(path, len(task.classnames))
            if cached is not None:
                return cached
    head = build_zero_shot_head(base.model, base.tokenizer, task.classnames, task.templates).cpu()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            save_file({"head": head.contiguous()}, str(tmp), metadata={"base_id": base.base_id, "task": task.name})
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
    return head


def _read_cached_head(path: Path, n_classes: int) -> torch.Tensor | None:
    """A cached head, or None (with a warning) when the file is unreadable, not safetensors or of the wrong shape.

    A cache file is never trusted more than a download: it is parsed as safetensors only (a planted pickle
    is not executed) and rebuilt when anything is off.
    """
    from merging.io import MergeInputError, load_state_dict

    try:
        head = load_state_dict(path).get("head")
    except MergeInputError as e:
        warnings.warn(f"ignoring the cached zero-shot head ({e}); rebuilding it", stacklevel=3)
        return None
    if head is None or head.dim() != 2 or head.shape[0] != n_classes or not head.is_floating_point() \
            or not bool(torch.isfinite(head).all()):
        warnings.warn(f"ignoring the cached zero-shot head {path} (not a finite ({n_classes}, D) tensor 'head'); "
                      "rebuilding it", stacklevel=3)
        return None
    return head


class ImageClassifier(nn.Module):
    """An image encoder with a frozen zero-shot head: logits (B, C) = normalize(f(x)) @ head.T.

    ``head`` (C, D) is a buffer, never a parameter, so only the encoder trains.
    """

    def __init__(self, encoder: nn.Module, head: torch.Tensor):
        super().__init__()
        self.encoder = encoder
        self.register_buffer("head", head.clone(), persistent=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Raw (un-normalised) image embeddings (B, D)."""
        return self.encoder(x)

    def logits(self, features: torch.Tensor, head: torch.Tensor | None = None) -> torch.Tensor:
        head = self.head if head is None else head
        return F.normalize(features, dim=-1) @ head.to(features.dtype).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(x))
