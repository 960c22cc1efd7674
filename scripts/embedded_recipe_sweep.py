"""Search the embedded scale's recipe (docs/design.md §5.1's open problem) on one GPU, in a few minutes.

    python scripts/embedded_recipe_sweep.py --device cuda --out sweep_out

Pre-trains several base models in parallel processes with the real ``modeling.pretrain.pretrain``,
then for each base fine-tunes every synthetic task under several recipes (the same math as
``lightning_modules.finetune.FineTune``: frozen zero-shot head, AdamW, warm-up + cosine, clip 1.0,
batch 128) on the same renders the main job uses, and evaluates zero-shot, individual and Task
Arithmetic accuracy over λ. Writes ``sweep.jsonl`` and the bases' weights. A research tool: the
main job never runs it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRETRAIN_GRID = [
    dict(name="s1500_d05", steps=1500, difficulty=0.5),
    dict(name="s1500_d00", steps=1500, difficulty=0.0),
    dict(name="s600_d05", steps=600, difficulty=0.5),
    dict(name="s2500_d05", steps=2500, difficulty=0.5),
]
FINETUNE_GRID = [dict(lr=lr, wd=wd, steps=300) for lr in (3e-5, 1e-4, 3e-4, 1e-3) for wd in (0.0, 0.1)]
TASKS = ("shapes", "digits", "textures", "colours")
LAMBDAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
if os.environ.get("SWEEP_LRS"):  # e.g. SWEEP_LRS=3e-4,1e-3 to check a few recipes only
    FINETUNE_GRID = [dict(lr=float(lr), wd=0.0, steps=300) for lr in os.environ["SWEEP_LRS"].split(",")]
if os.environ.get("SWEEP_SMOKE"):  # a seconds-long dry run of the whole script on CPU
    PRETRAIN_GRID = [dict(g, steps=4) for g in PRETRAIN_GRID[:2]]
    FINETUNE_GRID = [dict(f, steps=3) for f in FINETUNE_GRID[:2]]


def _pretrain_worker(cfg: dict, out: str, device: str, threads: int):
    import torch

    torch.set_num_threads(threads)
    from modeling.pretrain import pretrain

    cfg = dict(cfg)
    name = cfg.pop("name")
    meta = pretrain(Path(out) / f"base_{name}.safetensors", device=device, log_every=500, **cfg)
    return name, meta["zero_shot_quick"], meta["seconds"]


def render_sets(n_train: int, n_test: int, seed: int = 0):
    """The main job's renders (datamodules.synthetic.render_task) as normalised float tensors."""
    import torch

    from datamodules.synthetic import render_task
    from modeling.pretrain import normalise

    out = {}
    for t in TASKS:
        sets = []
        for split, n in (("train", n_train), ("test", n_test)):
            x, y = render_task(t, split, n, seed=seed)
            sets.append((normalise(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255), torch.from_numpy(y)))
        out[t] = sets
    return out


def sweep_base(path: Path, data: dict, device: str, log):
    import copy

    import torch
    import torch.nn.functional as F

    from datamodules.synthetic import SYNTHETIC_CLASSNAMES, SYNTHETIC_TEMPLATES
    from lightning_modules.finetune import warmup_cosine
    from modeling.clip import build_zero_shot_head, load_base_model

    base = load_base_model("badmerging-tiny", str(path), device=device)
    heads = {t: build_zero_shot_head(base.model, base.tokenizer, SYNTHETIC_CLASSNAMES[t], SYNTHETIC_TEMPLATES[t]) for t in TASKS}
    enc0 = base.model.visual
    theta0 = {k: v.detach().clone() for k, v in enc0.state_dict().items()}

    @torch.no_grad()
    def acc(enc, t):
        x, y = data[t][1]
        enc.eval()
        f = F.normalize(enc(x.to(device)), dim=-1)
        return (f @ heads[t].T).argmax(1).cpu().eq(y).float().mean().item()

    zs = {t: acc(enc0, t) for t in TASKS}
    log({"base": path.name, "zero_shot": zs, "zs_mean": sum(zs.values()) / 4})
    for ft in FINETUNE_GRID:
        t0 = time.time()
        vectors, indiv = [], {}
        for t in TASKS:
            enc = copy.deepcopy(enc0).train()
            opt = torch.optim.AdamW(enc.parameters(), lr=ft["lr"], weight_decay=ft["wd"])
            sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(min(30, ft["steps"] // 2), ft["steps"]))
            g = torch.Generator().manual_seed(0)
            x, y = data[t][0]
            for step in range(ft["steps"]):
                idx = torch.randint(0, len(y), (128,), generator=g)
                logits = F.normalize(enc(x[idx].to(device)), dim=-1) @ heads[t].T
                loss = F.cross_entropy(logits, y[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(enc.parameters(), 1.0)
                opt.step()
                sched.step()
            indiv[t] = acc(enc, t)
            sd = enc.state_dict()
            vectors.append({k: sd[k] - theta0[k] for k in theta0 if theta0[k].is_floating_point()})
        ta = {}
        enc = copy.deepcopy(enc0)
        for lam in LAMBDAS:
            enc.load_state_dict({k: theta0[k] + lam * sum(v[k] for v in vectors) if k in vectors[0] else theta0[k] for k in theta0})
            accs = {t: acc(enc, t) for t in TASKS}
            ta[lam] = {"accs": accs, "mean": sum(accs.values()) / 4}
        best = max(ta, key=lambda l: ta[l]["mean"])
        norms = {t: float(torch.sqrt(sum((v ** 2).sum() for v in vec.values()))) for t, vec in zip(TASKS, vectors)}
        log({"base": path.name, "ft": ft, "indiv": indiv, "indiv_min": min(indiv.values()), "zs_mean": sum(zs.values()) / 4,
             "ta_best_lambda": best, "ta_best_mean": ta[best]["mean"], "ta_best_accs": ta[best]["accs"],
             "ta_curve": {l: round(v["mean"], 4) for l, v in ta.items()}, "tv_norms": norms, "seconds": round(time.time() - t0, 1)})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="sweep_out")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--n_train", type=int, default=20000)
    p.add_argument("--bases", nargs="*", default=None, help="skip pre-training, sweep these base files")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "sweep.jsonl", "a")

    def log(rec):
        print(json.dumps(rec), flush=True)
        logf.write(json.dumps(rec) + "\n")
        logf.flush()

    t0 = time.time()
    bases = [Path(b) for b in a.bases] if a.bases else []
    if not bases:
        threads = max(1, (os.cpu_count() or 4) // a.workers)
        with mp.get_context("spawn").Pool(a.workers) as pool:
            res = pool.starmap(_pretrain_worker, [(c, str(out), a.device, threads) for c in PRETRAIN_GRID])
        for name, zs, sec in res:
            log({"pretrained": name, "zero_shot_quick": zs, "seconds": sec})
        bases = [out / f"base_{c['name']}.safetensors" for c in PRETRAIN_GRID]
    import torch

    torch.set_num_threads(os.cpu_count() or 4)
    data = render_sets(a.n_train, 1000)
    log({"rendered": True, "t": round(time.time() - t0, 1)})
    for b in bases:
        sweep_base(b, data, a.device, log)
    log({"done": True, "t": round(time.time() - t0, 1)})


if __name__ == "__main__":
    main()
