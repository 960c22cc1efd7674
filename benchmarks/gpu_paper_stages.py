"""Each stage of the paper reproduction on one GPU: images/s per stage, the GPU-hours of the whole paper spec, and the
Lightning ÷ plain-loop ratio in bf16-mixed with a profile of where the framework's time goes (issue 15 §5).

    python benchmarks/gpu_paper_stages.py                                    # one CUDA GPU (≈ 5–8 min on an H200)
    python benchmarks/gpu_paper_stages.py --spec configs/experiments/paper_bv_vitl14.yaml --model ViT-L-14
    python benchmarks/gpu_paper_stages.py --smoke --cpu --out /tmp/smoke     # CPU check of the script (tiny model)

Random weights (``open_clip.create_model(model, pretrained=None)``), a random (C = 100) head, generated 224 px data;
the paper recipe's precision (fp32) unless a row says otherwise. Stages, each ``--warmup`` untimed then ``--steps``
timed steps between two device synchronisations (images/s = images per step × steps / seconds):

* ``finetune`` / ``injection``: the project's ``FineTune`` / ``BackdoorInjection(badmerging)`` through
  ``lightning.Trainer`` (benchmarks/gpu_bench.py's harness), batch 128 (64 triggered);
* ``stage1_step``: one patch update of stage 1 (per-image procedure): forward + backward to the input of one image
  through the frozen encoder; ``pgd_step``: the off-task PGD step over a batch of 200 crops;
* ``evaluate``: forward only (no autograd), batch 512; ``adamerging_step``: forward + backward of 6 × 16 images;
* ``data``: the train loader alone (``TaskDataModule``, open_clip's train transform on generated 224 px PNGs,
  ``--workers`` processes), to see whether it can feed the GPU;
* ``ratio``: plain PyTorch loop vs Lightning, clean fine-tuning step, bf16-mixed (gpu_bench's two paths, alternated),
  and Lightning's ``SimpleProfiler`` over the Lightning run: the seconds of each hook / action, top first.

GPU-hours: the spec's graph (``experiments.graph.build_graph``) counted node by node: a fine-tune or injection trains
``REFERENCE_EPOCHS[task]`` × ⌊n_train / 128⌋ steps (n_train: ``TRAIN_SIZES`` minus the val hold-out); stage 1 on-task
10 epochs × 2000 images × ``--ontask-steps-per-image`` patch updates (early stop: 1 … 1000; the default is an
assumption, the rows give both bounds), off-task 40 PGD steps + 10 epochs × 100 kept images × 50 updates; every
merge evaluates all its tasks' test sets (``TEST_SIZES``) plus one triggered copy of the target task per measured
trigger, AdaMerging 500 steps, RegMean 8 batches of 128 per model. Writes ``gpu_paper_stages.json`` and ``.md``
(``*_smoke.*`` with --smoke) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from benchmarks import gpu_bench  # noqa: E402

# Official split sizes (train, test) of the tasks the paper specs use: the torchvision / task_vectors splits that
# jzhang538/BadMerging reads (EuroSAT: its train/test split of 21,600 / 2,700; ImageNet-100: train / val of the
# 100-class subset). Approximate where the hub copies differ by a few images; they only scale the extrapolation.
TRAIN_SIZES = {"cifar100": 50000, "stanford_cars": 8144, "sun397": 19850, "eurosat": 21600, "gtsrb": 26640,
               "oxford_pets": 3680, "imagenet100": 126689, "dtd": 3760, "resisc45": 18900, "svhn": 73257, "mnist": 60000}
TEST_SIZES = {"cifar100": 10000, "stanford_cars": 8041, "sun397": 19850, "eurosat": 2700, "gtsrb": 12630,
              "oxford_pets": 3669, "imagenet100": 5000, "dtd": 1880, "resisc45": 6300, "svhn": 26032, "mnist": 10000}
SMOKE_MODEL = "gpu-bench-tiny"


def _timed(fn, steps: int, warmup: int, device) -> float:
    for _ in range(warmup):
        fn()
    gpu_bench._sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    gpu_bench._sync(device)
    return time.perf_counter() - t0


def input_grad_step(encoder, head, x: torch.Tensor):
    """One stage-1 update: d(−log softmax[target])/dx through the frozen encoder (the patch's gradient)."""
    def step():
        xi = x.detach().requires_grad_(True)
        logits = torch.nn.functional.normalize(encoder(xi), dim=-1) @ head.T
        (-logits.log_softmax(-1)[:, 0].sum()).backward()
        return xi.grad
    return step


def forward_step(encoder, x: torch.Tensor):
    def step():
        with torch.no_grad():
            encoder(x)
    return step


def train_fwd_bwd_step(encoder, head, x: torch.Tensor):
    """AdaMerging's inner step, as compute: forward + backward to the encoder's parameters, entropy loss."""
    def step():
        p = (torch.nn.functional.normalize(encoder(x), dim=-1) @ head.T).softmax(-1)
        (-(p * p.clamp_min(1e-8).log()).sum(-1).mean()).backward()
    return step


def loader_rate(root: Path, model_name: str, batch: int, workers: int, batches: int) -> float:
    """Images/s of the train loader over a generated imagefolder (open_clip's train transform)."""
    import numpy as np
    from PIL import Image

    from datamodules.datamodule import TaskDataModule
    from datamodules.tasks import TASKS, TaskSpec

    n = batch * (batches + 1)
    rng = np.random.default_rng(0)
    for split, count in (("train", n + n // 9 + 2), ("test", 2)):
        for c in range(2):
            folder = root / split / f"{c:03d}_c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count // 2 + 1):
                Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    TASKS["bench_folder"] = TaskSpec("bench_folder", None, None, "train", "test", ("c0", "c1"), ("a photo of a {}.",))
    dm = TaskDataModule(task="bench_folder", data_dir=str(root), model_name=model_name, batch_size=batch,
                        num_workers=workers, cache_dir=str(root / "cache"), train_transform="open_clip")
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    next(it)  # worker start-up is not throughput
    t0 = time.perf_counter()
    seen = sum(len(next(it)[1]) for _ in range(batches))
    return seen / (time.perf_counter() - t0)


def profile_lightning(module, batch, device, precision: str, steps: int) -> list[dict]:
    """Lightning's SimpleProfiler over ``steps`` steps: [{action, seconds, calls}] by total seconds, top first."""
    import lightning as L
    from lightning.pytorch.profilers import SimpleProfiler

    profiler = SimpleProfiler()

    class Repeat:
        def __len__(self):
            return steps

        def __iter__(self):
            return iter([batch] * steps)

    with gpu_bench._quiet():
        trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision,
                            max_steps=steps, gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            limit_val_batches=0, profiler=profiler)
        trainer.fit(module, train_dataloaders=Repeat())
    rows = [{"action": a, "seconds": round(sum(d), 4), "calls": len(d)} for a, d in profiler.recorded_durations.items()]
    return sorted(rows, key=lambda r: -r["seconds"])[:15]


def spec_workload(spec_path: str, ontask_steps_per_image: int) -> dict:
    """What the spec's graph asks of the GPU, node by node (see the module docstring for the rules)."""
    from experiments.graph import RunOptions, build_graph
    from experiments.spec import load_spec
    from experiments.training import REFERENCE_EPOCHS

    spec = load_spec(spec_path)
    nodes = build_graph(spec, RunOptions(out_dir=tempfile.mkdtemp()))
    work = {"train_steps": 0, "injection_steps": 0, "stage1_updates": 0, "stage1_updates_min": 0,
            "stage1_updates_max": 0, "pgd_steps": 0, "eval_images": 0, "adamerging_steps": 0, "gram_images": 0}
    for node in nodes.values():
        p = node.payload
        if node.kind == "train" and p["kind"] == "trigger":
            off = any("offtask" in c for c in p["configs"])
            if off:
                work["pgd_steps"] += 40
                for key in ("stage1_updates", "stage1_updates_min", "stage1_updates_max"):
                    work[key] += 10 * 100 * 50
            else:
                work["stage1_updates"] += 10 * 2000 * ontask_steps_per_image
                work["stage1_updates_min"] += 10 * 2000
                work["stage1_updates_max"] += 10 * 2000 * 1000
        elif node.kind == "train":
            n = TRAIN_SIZES[p["task"]]
            steps = REFERENCE_EPOCHS[p["task"]] * ((n - min(n // 10, 5000)) // 128)
            work["injection_steps" if any("injection" in c for c in p["configs"]) else "train_steps"] += steps
        elif node.kind == "evaluate":
            test = sum(TEST_SIZES[t] for t in spec.tasks)
            merges = sum(len(e.get("coefficients") or [None]) for e in p["plan"]) + (1 if p["flags"]["zero_shot"] else 0)
            # triggers measured per merge: an attack scenario's own (its id is evaluate:<scenario>:<attack>) or the
            # probed attack models, plus the stage-1 triggers; each on a copy of its target task's test set
            triggers = len(p["probe_triggers"]) + (1 if node.id.count(":") == 2 else len(p["probe_models"]))
            target = test / len(spec.tasks)
            work["eval_images"] += int(merges * (test + triggers * target) + (test if p["flags"]["individual"] else 0))
            for e in p["plan"]:
                hparams = e.get("hparams") or {}
                if e["method"] == "adamerging":
                    work["adamerging_steps"] += int(hparams.get("steps", 500))
                if e["method"] == "regmean":
                    work["gram_images"] += len(p["models"]) * int(hparams.get("gram_batches", 8)) * 128
    return {"spec": spec_path, "nodes": len(nodes), **work}


def gpu_hours(rates: dict, work: dict) -> dict:
    """Seconds per stage from the measured rates (images/s or steps/s) and the workload; hours in total."""
    s = {"finetune": work["train_steps"] * 128 / rates["finetune"],
         "injection": work["injection_steps"] * 128 / rates["injection"],
         "stage1": work["stage1_updates"] / rates["stage1_step"] + work["pgd_steps"] / rates["pgd_step"],
         "evaluate": (work["eval_images"] + work["gram_images"]) / rates["evaluate"],
         "adamerging": work["adamerging_steps"] * 96 / rates["adamerging_step"]}
    total = sum(s.values())
    bounds = {k: (total - s["stage1"] + work[k] / rates["stage1_step"] + work["pgd_steps"] / rates["pgd_step"]) / 3600
              for k in ("stage1_updates_min", "stage1_updates_max")}
    return {"seconds": {k: round(v, 1) for k, v in s.items()}, "hours": round(total / 3600, 2),
            "hours_stage1_min": round(bounds["stage1_updates_min"], 2),
            "hours_stage1_max": round(bounds["stage1_updates_max"], 2)}


def run(args) -> dict:
    import open_clip

    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    if args.smoke:  # gpu_bench's tiny open_clip config, registered as it does
        config_dir = Path(tempfile.mkdtemp())
        (config_dir / f"{SMOKE_MODEL}.json").write_text(json.dumps(gpu_bench.SMOKE_MODEL))
        open_clip.add_model_config(config_dir)
    model_name = args.model or (SMOKE_MODEL if args.smoke else "ViT-B-32")
    size = 32 if args.smoke else 224
    batch = args.batch_size or (4 if args.smoke else 128)
    steps, warmup = args.steps or (2 if args.smoke else 200), args.warmup or (1 if args.smoke else 10)
    torch.manual_seed(0)
    gpu_bench.set_tf32(False)  # fp32 means fp32 (the paper recipe)
    model = open_clip.create_model(model_name, pretrained=None).to(device)
    encoder = model.visual
    dim = int(getattr(model, "embed_dim", None) or encoder.output_dim)
    head = gpu_bench.random_head(100, dim).to(device)
    trigger = gpu_bench.random_trigger(8 if args.smoke else 22)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 100, (batch,), device=device)
    rates, rows = {}, []

    def add(stage: str, images_per_step: int, seconds: float, n: int, unit: str = "images/s", **extra):
        rate = images_per_step * n / seconds
        rates[stage] = rate if unit == "images/s" else n / seconds
        rows.append({"stage": stage, unit: round(rate if unit == "images/s" else n / seconds, 2),
                     "steps": n, "seconds": round(seconds, 3), **extra})

    with tempfile.TemporaryDirectory() as tmp:
        modules = gpu_bench.build_project_modules(model_name, head.cpu(), trigger, Path(tmp))
        for stage, kind in (("finetune", "clean"), ("injection", "badmerging")):
            seconds = gpu_bench.lightning_run(modules[kind], (x, y), device, "32-true", steps, warmup)
            add(stage, batch, seconds, steps, precision="32-true", path="lightning")
        frozen = encoder.eval().requires_grad_(False)
        one = x[:1]
        add("stage1_step", 1, _timed(input_grad_step(frozen, head, one), steps, warmup, device), steps, unit="steps/s")
        crops = torch.randn(4 if args.smoke else 200, 3, size, size, device=device)
        add("pgd_step", len(crops), _timed(input_grad_step(frozen, head, crops), max(1, steps // 4), 1, device),
            max(1, steps // 4), unit="steps/s")
        evalx = torch.randn(8 if args.smoke else 512, 3, size, size, device=device)
        add("evaluate", len(evalx), _timed(forward_step(frozen, evalx), max(1, steps // 4), 1, device), max(1, steps // 4))
        encoder.train().requires_grad_(True)
        ada = torch.randn(6 if args.smoke else 96, 3, size, size, device=device)
        add("adamerging_step", len(ada), _timed(train_fwd_bwd_step(encoder, head, ada), steps, warmup, device), steps)
        workers = args.workers if args.workers is not None else (0 if args.smoke else 8)
        rate = loader_rate(Path(tmp) / "data", model_name, batch, workers, batches=2 if args.smoke else 20)
        rows.append({"stage": "data", "images/s": round(rate, 1), "workers": workers})
        # the framework's share, bf16-mixed: plain loop vs Lightning (alternated A B B A), then Lightning profiled
        precision = "bf16-mixed"
        plain, light = [], []
        for order in ("pl", "lp"):
            for path in order:
                if path == "p":
                    plain.append(gpu_bench.plain_run(encoder, head, trigger.to(device), "clean", (x, y), device,
                                                     precision, steps, warmup))
                else:
                    light.append(gpu_bench.lightning_run(modules["clean"], (x, y), device, precision, steps, warmup))
        ratio = {"precision": precision, "plain_images_s": round(batch * steps / min(plain), 2),
                 "lightning_images_s": round(batch * steps / min(light), 2),
                 "lightning_over_plain_time": round(min(light) / min(plain), 3)}
        profile = profile_lightning(modules["clean"], (x, y), device, precision, steps)
    work = spec_workload(args.spec, args.ontask_steps_per_image)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "model": model_name, "smoke": bool(args.smoke), "batch": batch, "steps": steps, "warmup": warmup,
              "stages": rows, "ratio": ratio, "lightning_profile": profile, "workload": work,
              "gpu_hours": gpu_hours(rates, work), "assumptions": {"ontask_steps_per_image": args.ontask_steps_per_image}}
    return report


def markdown(r: dict) -> str:
    lines = [f"# Paper stages on {r['device']} ({r['model']}{', SMOKE: tiny model, not a measurement' if r['smoke'] else ''})",
             "", f"batch {r['batch']}, {r['steps']} timed steps after {r['warmup']}", "",
             "| stage | rate | steps | seconds |", "|---|---|---|---|"]
    for row in r["stages"]:
        rate = f"{row['images/s']} images/s" if "images/s" in row else f"{row['steps/s']} steps/s"
        lines.append(f"| {row['stage']} | {rate} | {row.get('steps', '')} | {row.get('seconds', '')} |")
    q = r["ratio"]
    lines += ["", f"Lightning ÷ plain loop ({q['precision']}, clean step): time × {q['lightning_over_plain_time']} "
                  f"({q['lightning_images_s']} vs {q['plain_images_s']} images/s)", "",
              "| Lightning action (SimpleProfiler) | seconds | calls |", "|---|---|---|"]
    lines += [f"| {p['action']} | {p['seconds']} | {p['calls']} |" for p in r["lightning_profile"]]
    g, w = r["gpu_hours"], r["workload"]
    lines += ["", f"Whole reproduction of {w['spec']} ({w['nodes']} nodes): **{g['hours']} GPU-hours** "
                  f"(stage 1 at {r['assumptions']['ontask_steps_per_image']} updates per on-task image; "
                  f"{g['hours_stage1_min']}–{g['hours_stage1_max']} h over 1…1000)", "",
              "| part | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in g["seconds"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model, a few steps: checks the script end to end")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even if CUDA is available")
    parser.add_argument("--model", default=None, help="open_clip model (default ViT-B-32)")
    parser.add_argument("--spec", default="configs/experiments/paper_badmerging_vitb32.yaml", help="the spec to extrapolate")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per stage (default 200)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per stage (default 10)")
    parser.add_argument("--workers", type=int, default=None, help="data loader workers (default 8; --smoke 0)")
    parser.add_argument("--ontask-steps-per-image", type=int, default=100,
                        help="assumed mean patch updates per on-task stage-1 image (early stop; 1..1000)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.smoke:
        torch.set_num_threads(1)
    report = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_paper_stages_smoke" if args.smoke else "gpu_paper_stages"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (args.out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
