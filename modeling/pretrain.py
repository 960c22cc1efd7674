"""Build the embedded base model: contrastive (CLIP) pre-training on captioned synthetic renders.

    python -m modeling.pretrain --out modeling/weights/badmerging-tiny.safetensors   # ~5-8 min on 2 CPU cores

The base must know the synthetic domains only partly (as CLIP ViT-B/32 knows EuroSAT or SVHN), so it
is trained on renders of ``--difficulty`` below the downstream tasks' 1.0, with captions that name the
class (and for shapes sometimes the colour). Captions that are identical inside a batch are all
treated as positives of each other, otherwise the loss would punish the model for seeing that two
"red square" images match both "a red square." captions.

The result is a plain safetensors state dict of the whole CLIP model (both towers); its header
metadata records the recipe, the compact vocabulary and the code version.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from datamodules.synthetic import TASK_NAMES, caption_vocabulary, captions_for, render_batch
from modeling.clip import CONFIG_DIR, EMBEDDED_MODEL  # noqa: F401  (registers the config)
from modeling.tokenizer import CompactTokenizer
from modeling.version import code_version


def clip_loss(img: torch.Tensor, txt: torch.Tensor, captions: list[str], logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over (B, D) normalised embeddings; targets spread over identical captions."""
    logits = logit_scale * img @ txt.T
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    cid = torch.tensor([ids[c] for c in captions], device=img.device)
    same = (cid[:, None] == cid[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean() + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean())


def normalise(img: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (img - mean) / std


def sample_batch(g: torch.Generator, batch: int, difficulty: float, size: int, colour_drop: float):
    """A batch mixing all synthetic tasks: normalised images (B, 3, S, S) and captions."""
    task_of = torch.randint(0, len(TASK_NAMES), (batch,), generator=g)
    images, captions = [], []
    for t, task in enumerate(TASK_NAMES):
        n = int((task_of == t).sum())
        if n == 0:
            continue
        labels = torch.randint(0, 10, (n,), generator=g)
        d = difficulty * torch.rand(1, generator=g).item()  # a spread of difficulties up to the cap
        img, attrs = render_batch(task, labels, g, size=size, difficulty=d)
        images.append(img)
        captions += captions_for(task, labels, attrs, g, colour_drop=colour_drop)
    return normalise(torch.cat(images)), captions


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, n: int = 500, size: int = 24, seed: int = 1, device: str = "cpu") -> dict[str, float]:
    """Quick zero-shot accuracy per synthetic task on fresh downstream renders (difficulty 1)."""
    from datamodules.synthetic import SYNTHETIC_CLASSNAMES, SYNTHETIC_TEMPLATES
    from modeling.clip import build_zero_shot_head

    model.eval()
    out = {}
    for task in TASK_NAMES:
        head = build_zero_shot_head(model, tokenizer, SYNTHETIC_CLASSNAMES[task], SYNTHETIC_TEMPLATES[task])
        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(n) % 10
        img, _ = render_batch(task, labels, g, size=size, difficulty=1.0)
        f = F.normalize(model.encode_image(normalise(img).to(device)), dim=-1)
        out[task] = (f @ head.T).argmax(1).cpu().eq(labels).float().mean().item()
    model.train()
    return out


def pretrain(out: Path, steps: int = 1500, batch: int = 128, lr: float = 1e-3, weight_decay: float = 0.1,
             warmup: int = 100, difficulty: float = 0.5, colour_drop: float = 0.5, seed: int = 0,
             threads: int | None = None, log_every: int = 100, model_name: str = EMBEDDED_MODEL, device: str = "cpu") -> dict:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tokenizer = CompactTokenizer.from_texts(caption_vocabulary(), context_length=32)
    cfg = open_clip.get_model_config(model_name)
    if tokenizer.vocab_size > cfg["text_cfg"]["vocab_size"]:
        raise ValueError(f"compact vocabulary has {tokenizer.vocab_size} ids > vocab_size {cfg['text_cfg']['vocab_size']} in the config")
    model = open_clip.create_model(model_name, pretrained=None).to(device)
    size = cfg["vision_cfg"]["image_size"]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))
    )
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    model.train()
    for step in range(steps):
        images, captions = sample_batch(g, batch, difficulty, size, colour_drop)
        img = F.normalize(model.encode_image(images.to(device)), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(captions).to(device)), dim=-1)
        loss = clip_loss(img, txt, captions, model.logit_scale.exp().clamp(max=100))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.time() - t0:6.1f}s", flush=True)
    zs = zero_shot_accuracy(model, tokenizer, size=size, device=device)
    recipe = dict(steps=steps, batch=batch, lr=lr, weight_decay=weight_decay, warmup=warmup,
                  difficulty=difficulty, colour_drop=colour_drop, seed=seed)
    meta = {"model_name": model_name, "recipe": recipe, "bpe_ids": tokenizer.bpe_ids, "context_length": 32,
            "zero_shot_quick": zs, "seconds": round(time.time() - t0, 1), "code_version": code_version()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    # float16 on disk keeps the shipped base under 5 MB; θ_pre is defined as these rounded weights.
    state = {k: (v.half() if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={"badmerging": json.dumps(meta)})
    os.replace(tmp, out)
    print(json.dumps({"out": str(out), "zero_shot": zs, "seconds": meta["seconds"]}))
    return meta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("modeling/weights/badmerging-tiny.safetensors"))
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--difficulty", type=float, default=0.5)
    p.add_argument("--colour-drop", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--log-every", type=int, default=100)
    a = p.parse_args(argv)
    pretrain(a.out, a.steps, a.batch, a.lr, a.weight_decay, a.warmup, a.difficulty, a.colour_drop, a.seed, a.threads, a.log_every)


if __name__ == "__main__":
    main()
