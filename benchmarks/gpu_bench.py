"""GPU training throughput and model FLOP utilisation: clean fine-tuning vs BadMerging injection (issue 8, item 6).

    python3 benchmarks/gpu_bench.py                          # one CUDA GPU: ~2-3 min on an H100 / H200
    python3 benchmarks/gpu_bench.py --out /tmp/gpu_bench     # results elsewhere
    python benchmarks/gpu_bench.py --smoke --out /tmp/smoke  # CPU end-to-end check (tiny model, seconds)

Model: ``open_clip.create_model("ViT-B-32", pretrained=None)`` (random weights), image tower trained,
frozen random head H (C = 100, D = 512; rows unit-norm × 100), batch 128 random 224 px images,
AdamW (lr 1e-5, wd 0.1), warm-up + cosine LambdaLR per step, gradient-norm clip 1.0 (docs/design.md §7).

* clean step:       L = CE(normalize(f_θ(x)) @ Hᵀ, y)
* BadMerging step:  the first 64 images get a 22 px patch → x_bd; one f_θ pass over [x; x_bd] (192 images),
                    f_pre(x_bd) without autograd (64 images), L = L_clean + 5·CE(normalize(r·z_θ + (1−r)·z_pre) @ Hᵀ, 0),
                    r ~ U(0.2, 1) — model FLOPs (192·3 + 64) / (128·3) ≈ 1.67 × a clean step.

Each (precision, step kind) runs through two paths, alternated (A B B A) ``--repeats`` times:

* plain: a hand-written PyTorch loop of the math above (only torch + open_clip);
* lightning: the project's ``FineTune`` / ``BackdoorInjection`` (task cifar100, zero-shot head replaced by
  the same random head) driven by ``lightning.Trainer`` (logger, checkpointing, progress bar, model
  summary off) on an in-memory iterable of the same device batch. Skipped, and said so in the output,
  when lightning or the project's modules cannot be imported (e.g. a bare python with torch + open_clip).

Precisions: ``32-true`` with TF32 off (matmul "highest", cudnn.allow_tf32 False), ``32-true`` with TF32
on ("high", cudnn.allow_tf32 True), and ``bf16-mixed`` (torch.autocast bf16; TF32 on for what stays fp32).

Timing: ``--warmup`` untimed steps, then ``--steps`` steps between two ``torch.cuda.synchronize()``
calls: images/s = 128 · steps / seconds (the batch, not the encoder passes). MFU = model FLOPs per
step · steps/s ÷ peak, model FLOPs = 3 × forward per trained image + 1 × forward per frozen image, the
forward FLOPs per image counted with ``torch.utils.flop_counter.FlopCounterMode`` on the train-mode
encoder. Peak (dense, per GPU): H100 SXM / H200 bf16 989, TF32 494, fp32 67 TFLOP/s (H100 PCIe 756 /
378 / 51, A100 312 / 156 / 19.5); fp32 rows divide by the fp32 peak, TF32 rows by the TF32 peak,
bf16 rows by the bf16 peak. Other devices: pass ``--peaks BF16,TF32,FP32`` or get MFU null.

Writes ``gpu_bench.json`` and ``gpu_bench.md`` (``gpu_bench_smoke.*`` with --smoke) into ``--out``.
Imports only torch, open_clip and (optionally) lightning + the project's modules.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# Dense peak TFLOP/s per GPU: (bf16, tf32, fp32).
PEAKS = {"H100 PCIe": (756.0, 378.0, 51.0), "H100": (989.0, 494.0, 67.0), "H200": (989.0, 494.0, 67.0),
         "A100": (312.0, 156.0, 19.5)}
PRECISIONS = (("32-true", False), ("32-true", True), ("bf16-mixed", True))  # (Lightning precision, TF32)
RECIPE = {"lr": 1e-5, "weight_decay": 0.1, "warmup_steps": 500}  # docs/design.md §7 (FineTune's defaults)
ATTACK = {"poison_fraction": 0.5, "alpha": 5.0, "r_min": 0.2, "r_max": 1.0, "target": 0}
SMOKE_MODEL = {  # a tiny open_clip config registered at run time for --smoke
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@contextlib.contextmanager
def _quiet():
    loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "lightning.fabric", "root")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def set_tf32(on: bool) -> dict:
    """TF32 for fp32 matmuls (set_float32_matmul_precision high/highest) and cuDNN convolutions."""
    with _quiet():
        torch.set_float32_matmul_precision("high" if on else "highest")
        torch.backends.cudnn.allow_tf32 = on
        return {"float32_matmul_precision": torch.get_float32_matmul_precision(),
                "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
                "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32)}


def warmup_cosine(warmup_steps: int, total_steps: int):
    """lr multiplier, as lightning_modules.finetune.warmup_cosine (copied: this script must run without it)."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def random_head(classes: int, dim: int, seed: int = 0) -> torch.Tensor:
    """(C, D) unit rows × 100, the shape and scale of a CLIP zero-shot head."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(classes, dim, generator=g), dim=-1) * 100.0


def random_trigger(size: int, seed: int = 1) -> torch.Tensor:
    """(3, L, L) patch of uniform pixels in CLIP-normalised space."""
    import open_clip

    g = torch.Generator().manual_seed(seed)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)
    return (torch.rand(3, size, size, generator=g) - mean) / std


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str):
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# plain PyTorch
# ---------------------------------------------------------------------------------------------
class PlainStep:
    """The clean or BadMerging training step of the module docstring, as a plain PyTorch loop body."""

    def __init__(self, encoder, head, trigger, kind: str, device, precision: str, total_steps: int):
        self.encoder, self.head, self.trigger, self.kind = encoder.train(), head, trigger, kind
        self.device, self.precision = device, precision
        self.frozen = copy.deepcopy(encoder).eval().requires_grad_(False) if kind == "badmerging" else None
        self.params = [p for p in encoder.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
        warmup = min(RECIPE["warmup_steps"], max(1, total_steps // 2))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_cosine(warmup, total_steps))
        self.r_gen = torch.Generator().manual_seed(1234)

    def logits(self, z, head=None):
        head = self.head if head is None else head
        return F.normalize(z, dim=-1) @ head.to(z.dtype).T

    def add_trigger(self, x):
        size = self.trigger.shape[-1]
        x_bd = x.clone()
        x_bd[..., -size:, -size:] = self.trigger.to(x.dtype)
        return x_bd

    def loss(self, x, y):
        if self.kind == "clean":
            return F.cross_entropy(self.logits(self.encoder(x)), y)
        n = int(ATTACK["poison_fraction"] * x.shape[0])
        x_bd = self.add_trigger(x[:n])
        z = self.encoder(torch.cat([x, x_bd]))
        clean = F.cross_entropy(self.logits(z[: x.shape[0]]), y)
        with torch.no_grad():
            z_pre = self.frozen(x_bd)
        r = ATTACK["r_min"] + (ATTACK["r_max"] - ATTACK["r_min"]) * torch.rand((), generator=self.r_gen).item()
        z_mix = r * z[x.shape[0]:] + (1 - r) * z_pre
        target = torch.full((n,), ATTACK["target"], dtype=torch.long, device=x.device)
        return clean + ATTACK["alpha"] * F.cross_entropy(self.logits(z_mix), target)

    def __call__(self, x, y):
        with _autocast(self.device, self.precision):
            loss = self.loss(x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()


def plain_run(encoder, head, trigger, kind, batch, device, precision, steps, warmup) -> float:
    """Seconds for ``steps`` plain steps after ``warmup`` (synchronised at both ends)."""
    step = PlainStep(encoder, head, trigger, kind, device, precision, warmup + steps)
    x, y = batch
    for _ in range(warmup):
        step(x, y)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    _sync(device)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# the project's modules through lightning.Trainer
# ---------------------------------------------------------------------------------------------
def project_available() -> tuple[bool, str | None]:
    try:
        import lightning  # noqa: F401

        from datamodules.triggers import save_trigger  # noqa: F401
        from lightning_modules.finetune import FineTune  # noqa: F401
        from lightning_modules.injection import BackdoorInjection  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any missing package means plain-loop only
        return False, f"{type(e).__name__}: {e}"
    return True, None


def build_project_modules(model_name: str, head: torch.Tensor, trigger: torch.Tensor, workdir: Path) -> dict:
    """FineTune and BackdoorInjection(badmerging) on task cifar100 (C = 100) with ``head`` as the zero-shot head."""
    import open_clip

    import lightning_modules.finetune as finetune
    from datamodules.triggers import TriggerSpec, save_trigger
    from lightning_modules.injection import BackdoorInjection

    spec = TriggerSpec(kind="patch", size=int(trigger.shape[-1]), location="bottom_right", seed=1)
    path = workdir / "trigger.safetensors"
    save_trigger(path, trigger, spec, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD, {"stage": 1})
    original = finetune.zero_shot_head
    finetune.zero_shot_head = lambda base, task, cache_dir=None: head.clone()  # skip 100 × 18 random-text encodes
    try:
        with _quiet():
            common = dict(task="cifar100", model_name=model_name, pretrained=None, cache_dir=str(workdir), **RECIPE)
            clean = finetune.FineTune(**common)
            attack = BackdoorInjection(**common, attack="badmerging", trigger_path=str(path),
                                       target_class=ATTACK["target"], poison_fraction=ATTACK["poison_fraction"],
                                       alpha=ATTACK["alpha"], r_min=ATTACK["r_min"], r_max=ATTACK["r_max"])
    finally:
        finetune.zero_shot_head = original
    return {"clean": clean, "badmerging": attack}


def lightning_run(module, batch, device, precision, steps, warmup) -> float:
    """Seconds for ``steps`` Trainer steps after ``warmup``, synchronised in on_train_batch_end."""
    import lightning as L

    class Timer(L.Callback):
        def __init__(self):
            self.t0 = self.t1 = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == warmup - 1:
                _sync(device)
                self.t0 = time.perf_counter()
            elif batch_idx == warmup + steps - 1:
                _sync(device)
                self.t1 = time.perf_counter()

    class Repeat:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def __iter__(self):
            return iter([batch] * self.n)

    timer = Timer()
    with _quiet():
        trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision,
                            max_steps=warmup + steps, gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            limit_val_batches=0, callbacks=[timer])
        trainer.fit(module, train_dataloaders=Repeat(warmup + steps))
    return timer.t1 - timer.t0


# ---------------------------------------------------------------------------------------------
# FLOPs and peaks
# ---------------------------------------------------------------------------------------------
def forward_flops_per_image(encoder, image_size: int, device, n: int = 4) -> float:
    """FlopCounterMode count of one train-mode forward (autograd on, so no inference fast path) ÷ n images."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(n, 3, image_size, image_size, device=device)
    counter = FlopCounterMode(display=False)
    encoder.train()
    with counter:
        encoder(x)
    return counter.get_total_flops() / n


def model_flops_per_step(kind: str, batch_size: int, per_image: float) -> float:
    """3 × forward per trained image (forward + backward) + 1 × forward per frozen image."""
    if kind == "clean":
        return 3 * batch_size * per_image
    n = int(ATTACK["poison_fraction"] * batch_size)
    return 3 * (batch_size + n) * per_image + n * per_image


def device_peaks(device, override: str | None) -> tuple[dict | None, str]:
    """{'bf16', 'tf32', 'fp32'} dense TFLOP/s of this device, and where they come from."""
    if override:
        bf16, tf32, fp32 = (float(v) for v in override.split(","))
        return {"bf16": bf16, "tf32": tf32, "fp32": fp32}, "--peaks"
    if device.type != "cuda":
        return None, "no peak for CPU"
    name = torch.cuda.get_device_name(device)
    for key in PEAKS:  # "H100 PCIe" before "H100"
        if all(word in name for word in key.split()):
            bf16, tf32, fp32 = PEAKS[key]
            return {"bf16": bf16, "tf32": tf32, "fp32": fp32}, f"{key} datasheet (dense)"
    return None, f"unknown device {name!r}; pass --peaks"


def peak_key(precision: str, tf32: bool) -> str:
    return "bf16" if precision == "bf16-mixed" else ("tf32" if tf32 else "fp32")


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def environment(device) -> dict:
    info = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "host": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    try:
        import open_clip

        info["open_clip"] = open_clip.__version__
    except Exception:  # noqa: BLE001
        pass
    try:
        import lightning

        info["lightning"] = lightning.__version__
    except Exception:  # noqa: BLE001
        info["lightning"] = None
    if device.type == "cuda":
        info["cudnn"] = torch.backends.cudnn.version()
    try:
        from modeling.version import code_version

        info["code_version"] = code_version()
    except Exception:  # noqa: BLE001
        info["code_version"] = "unknown"
    return info


def run(args, save=None) -> dict:
    """Measure every (precision, step kind, path); ``save(report)`` after each group (partial results survive a kill)."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    workdir = Path(tempfile.mkdtemp(prefix="gpu_bench_"))
    try:
        return _run(args, device, workdir, save or (lambda report: None))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _ratios(rows: list[dict], paths) -> list[dict]:
    """Lightning ÷ plain images/s per (precision, kind); BadMerging ÷ clean step time per (precision, path)."""

    def find(precision, tf32, kind, path):
        return next((r for r in rows if (r["precision"], r["tf32_on"], r["kind"], r["path"]) == (precision, tf32, kind, path)
                     and "images_per_s" in r), None)

    ratios = []
    for precision, tf32 in PRECISIONS:
        for kind in ("clean", "badmerging"):
            lit, plain = find(precision, tf32, kind, "lightning"), find(precision, tf32, kind, "plain")
            if lit and plain:
                ratios.append({"precision": precision, "tf32": tf32, "kind": kind,
                               "lightning_over_plain_images_per_s": lit["images_per_s"] / plain["images_per_s"]})
        for path in paths:
            c, b = find(precision, tf32, "clean", path), find(precision, tf32, "badmerging", path)
            if c and b:
                ratios.append({"precision": precision, "tf32": tf32, "path": path,
                               "badmerging_over_clean_step_time": c["images_per_s"] / b["images_per_s"]})
    return ratios


def _bench_inputs(args, device) -> tuple:
    """(encoder, image_size, D, head (C, D), trigger (3, L, L), batch (x (B, 3, S, S), y (B,))), all on ``device``.

    The encoder is ``args.model``'s random-weight image tower; x, y are drawn with seed 0.
    """
    import open_clip

    with _quiet():
        clip = open_clip.create_model(args.model, pretrained=None)
    encoder = clip.visual.to(device)
    del clip
    size = encoder.image_size
    image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
    dim = int(encoder.output_dim)
    head = random_head(args.classes, dim).to(device)
    trigger = random_trigger(args.trigger_size).to(device)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(args.batch_size, 3, image_size, image_size, generator=g).to(device),
             torch.randint(0, args.classes, (args.batch_size,), generator=g).to(device))
    return encoder, image_size, dim, head, trigger, batch


def _lightning_modules(args, head, trigger, workdir: Path) -> tuple[bool, str | None, dict]:
    """(available, reason skipped, {kind: module}): the project's modules, or why the lightning path is off."""
    available, why = (False, "--no-lightning") if args.no_lightning else project_available()
    modules = {}
    if available:
        try:
            modules = build_project_modules(args.model, head.cpu(), trigger.cpu(), workdir)
        except Exception as e:  # noqa: BLE001
            available, why = False, f"building the project's modules failed: {type(e).__name__}: {e}"
    return available, why, modules


def _time_paths(args, paths, modules, encoder, head, trigger, kind, batch, device, precision) -> tuple[dict, dict]:
    """({path: [seconds per run]}, {path: error}) over ``args.repeats`` runs, paths alternated A B B A."""
    seconds = {p: [] for p in paths}
    errors = {}
    for r in range(args.repeats):
        for path in (paths if r % 2 == 0 else paths[::-1]):
            if path in errors:
                continue
            try:
                if path == "plain":
                    s = plain_run(encoder, head, trigger, kind, batch, device, precision, args.steps, args.warmup)
                else:
                    s = lightning_run(modules[kind], batch, device, precision, args.steps, args.warmup)
                seconds[path].append(s)
            except Exception as e:  # noqa: BLE001 - one failing configuration must not lose the others
                errors[path] = (f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                                f" | {traceback.format_exc(limit=-3)[-1500:]}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return seconds, errors


def _add_rows(rows, args, paths, precision, tf32, tf32_state, kind, seconds, errors, per_image, peaks, t_start) -> None:
    """Append (and print) one row per path: median-run images/s, achieved TFLOP/s and MFU, or the error."""
    flops = model_flops_per_step(kind, args.batch_size, per_image)
    key = peak_key(precision, tf32)
    for path in paths:
        row = {"precision": precision, "tf32_on": tf32, "tf32": tf32_state, "kind": kind, "path": path,
               "seconds": seconds[path], "error": errors.get(path)}
        if seconds[path]:
            s = statistics.median(seconds[path])
            row.update({"steps_per_s": args.steps / s, "images_per_s": args.batch_size * args.steps / s,
                        "model_tflop_per_step": flops / 1e12, "achieved_tflop_s": flops * args.steps / s / 1e12,
                        "peak": key, "peak_tflop_s": peaks[key] if peaks else None})
            row["mfu"] = row["achieved_tflop_s"] / peaks[key] if peaks else None
        rows.append(row)
        desc = f"{row['images_per_s']:8.0f} img/s" if seconds[path] else f"error {errors[path].split(' | ')[0]}"
        mfu = f", MFU {row['mfu']:.3f} of {key} peak" if seconds[path] and row["mfu"] is not None else ""
        print(f"  {precision:10s} tf32={tf32!s:5s} {kind:10s} {path:9s} {desc}{mfu} "
              f"[{time.perf_counter() - t_start:.0f} s]", flush=True)


def _run(args, device, workdir: Path, save) -> dict:
    """The report of ``run``: every (precision, step kind, path) row, ``save(report)`` after each group."""
    import open_clip

    if args.smoke:
        (workdir / "gpu-bench-tiny.json").write_text(json.dumps(SMOKE_MODEL))
        open_clip.add_model_config(workdir)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    encoder, image_size, dim, head, trigger, batch = _bench_inputs(args, device)
    available, why, modules = _lightning_modules(args, head, trigger, workdir)
    paths = ("plain", "lightning") if available else ("plain",)

    per_image = forward_flops_per_image(encoder, image_size, device)
    peaks, peak_source = device_peaks(device, args.peaks)
    print(f"{environment(device)['device']}: {args.model} {image_size}px, {sum(p.numel() for p in encoder.parameters()) / 1e6:.1f}M "
          f"params, {per_image / 1e9:.2f} GFLOP forward per image; paths {paths}"
          + ("" if available else f" (lightning path skipped: {why})"), flush=True)

    rows = []
    report = {
        "command": " ".join(["python3 benchmarks/gpu_bench.py", *args.argv]),
        "env": environment(device),
        "setup": {"model": args.model, "pretrained": None, "image_size": image_size, "batch_size": args.batch_size,
                  "classes": args.classes, "embed_dim": dim, "trigger_size": args.trigger_size, "warmup": args.warmup,
                  "steps": args.steps, "repeats": args.repeats, "recipe": RECIPE, "attack": ATTACK, "smoke": args.smoke,
                  "encoder_params": sum(p.numel() for p in encoder.parameters())},
        "paths": list(paths), "lightning_path": {"available": available, "reason_skipped": why},
        "flops": {"forward_per_image": per_image, "counter": "torch.utils.flop_counter.FlopCounterMode",
                  "clean_step": model_flops_per_step("clean", args.batch_size, per_image),
                  "badmerging_step": model_flops_per_step("badmerging", args.batch_size, per_image)},
        "peaks_tflop_s": peaks, "peak_source": peak_source,
        "rows": rows, "ratios": [], "complete": False, "seconds_total": None,
    }
    for precision, tf32 in PRECISIONS:
        tf32_state = set_tf32(tf32)
        for kind in ("clean", "badmerging"):
            seconds, errors = _time_paths(args, paths, modules, encoder, head, trigger, kind, batch, device, precision)
            _add_rows(rows, args, paths, precision, tf32, tf32_state, kind, seconds, errors, per_image, peaks, t_start)
            report["ratios"], report["seconds_total"] = _ratios(rows, paths), time.perf_counter() - t_start
            save(report)
    report["complete"] = True
    save(report)
    return report


def markdown(report: dict) -> str:
    e, s = report["env"], report["setup"]
    lines = [f"# gpu_bench: clean vs BadMerging training throughput{' (SMOKE, not a measurement)' if s['smoke'] else ''}",
             "", f"`{report['command']}`", "",
             f"{e['device']} ({e['host']}); torch {e['torch']} (CUDA {e['cuda']}), open_clip {e.get('open_clip')}, "
             f"lightning {e['lightning']}; {e['date']}; code {e['code_version']}. {s['model']} random weights, "
             f"{s['image_size']} px, batch {s['batch_size']}, head C = {s['classes']}, D = {s['embed_dim']}; "
             f"{s['warmup']} warm-up + {s['steps']} timed steps, median of {s['repeats']} alternated runs; "
             f"{report['seconds_total'] or 0:.0f} s in all.",
             "", f"Forward FLOPs per image {report['flops']['forward_per_image'] / 1e9:.4g} G (FlopCounterMode); model "
                 f"TFLOP per step: clean {report['flops']['clean_step'] / 1e12:.2f}, BadMerging "
                 f"{report['flops']['badmerging_step'] / 1e12:.2f}. Peaks: {report['peaks_tflop_s']} TFLOP/s "
                 f"({report['peak_source']})."]
    if not report["complete"]:
        lines += ["", "**Incomplete**: the run stopped before every configuration was measured."]
    if not report["lightning_path"]["available"]:
        lines += ["", f"**Lightning path not measured**: {report['lightning_path']['reason_skipped']} (plain loop only)."]
    lines += ["", "| precision | TF32 | step | path | images/s | achieved TFLOP/s | MFU (peak) |", "|---|---|---|---|---:|---:|---|"]
    for r in report["rows"]:
        tf32 = "on" if r["tf32_on"] else "off"
        if "images_per_s" in r:
            mfu = f"{r['mfu']:.3f} ({r['peak']} {r['peak_tflop_s']:.0f})" if r["mfu"] is not None else "n/a"
            lines.append(f"| {r['precision']} | {tf32} | {r['kind']} | {r['path']} | {r['images_per_s']:.0f} | "
                         f"{r['achieved_tflop_s']:.1f} | {mfu} |")
        else:
            lines.append(f"| {r['precision']} | {tf32} | {r['kind']} | {r['path']} | error: {r['error'].split(' | ')[0]} | | |")
    if report["ratios"]:
        lines += ["", "| precision | TF32 | ratio | value |", "|---|---|---|---:|"]
        for q in report["ratios"]:
            tf32 = "on" if q["tf32"] else "off"
            if "lightning_over_plain_images_per_s" in q:
                lines.append(f"| {q['precision']} | {tf32} | {q['kind']}: Lightning ÷ plain images/s (target ≥ 0.95) "
                             f"| {q['lightning_over_plain_images_per_s']:.3f} |")
            else:
                lines.append(f"| {q['precision']} | {tf32} | {q['path']}: BadMerging ÷ clean step time (target ≤ 1.8) "
                             f"| {q['badmerging_over_clean_step_time']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model, batch 4, 1 + 2 steps: checks the script end to end")
    parser.add_argument("--model", default=None, help="open_clip model name (default ViT-B-32; --smoke: gpu-bench-tiny)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--trigger-size", type=int, default=None, help="patch side in px (default 22; --smoke 8)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per run (default 8)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 25)")
    parser.add_argument("--repeats", type=int, default=None, help="alternated runs per path (default 2)")
    parser.add_argument("--peaks", default=None, help="BF16,TF32,FP32 dense peak TFLOP/s of an unlisted device")
    parser.add_argument("--no-lightning", action="store_true", help="plain loop only")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; --smoke 1)")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even if CUDA is available")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    small = {"threads": 1, "model": "gpu-bench-tiny", "batch_size": 4, "trigger_size": 8, "warmup": 1, "steps": 2, "repeats": 1}
    full = {"threads": None, "model": "ViT-B-32", "batch_size": 128, "trigger_size": 22, "warmup": 8, "steps": 25, "repeats": 2}
    for key, value in (small if args.smoke else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.warmup < 1:
        parser.error("--warmup must be ≥ 1 (the timed window starts after a warm-up step)")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_bench_smoke" if args.smoke else "gpu_bench"

    def save(report):
        (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / f"{stem}.md").write_text(markdown(report))

    report = run(args, save)
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
