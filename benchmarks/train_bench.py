"""Training-step costs on CPU (issue 8, items 1, 2, 4): framework overhead, attack cost, data wait.

    nice -n 10 python benchmarks/train_bench.py                      # all parts, ~3.5 min on 2 busy cores
    python benchmarks/train_bench.py --parts framework --repeats 9   # one part, more repeats
    python benchmarks/train_bench.py --threads 2 --out /tmp/train_bench.json

Every ratio compares two runs made in this process on the same model (embedded ``badmerging-tiny``,
task ``shapes``), the same batch (``--batch-size`` 128 random normalised 24 px images, fixed labels)
and the same torch threads (``--threads``, default 1: on a 2-core machine shared with other jobs a
second OpenMP thread stalls at every barrier). Repetitions alternate A B B A A B ... and each ratio is
the median over repetitions of the ratio of the two neighbouring runs, so slow drifts of a shared
machine cancel. Steps per second always exclude ``--warmup`` steps (optimiser-state allocation).

1. framework: ``lightning.Trainer`` (CPU, 32-true, gradient_clip_val 1.0, **logger, checkpointing,
   progress bar and model summary off**) fitting ``FineTune`` on an in-memory iterable of the same batch,
   against a plain loop doing the same math on a second ``FineTune`` built the same way:
   ``CE(classifier.logits(classifier.features(x)), y)``, AdamW, the module's warm-up + cosine
   LambdaLR, ``clip_grad_norm_(1.0)``. Also a plain loop calling ``FineTune.training_step`` (metric
   update, finite check; ``self.log`` is a no-op without a trainer) to split module from Trainer cost.
   Target: Lightning steps/s ÷ plain steps/s ≥ 0.95.
2. attack: ``BackdoorInjection(attack="badmerging")`` against ``FineTune``, both in the same plain loop
   (``training_step`` → backward → clip → AdamW → scheduler), same batch. Target: step-time ratio
   ≤ 1.8 (the method's FLOPs: (192·3 + 64) / (128·3) ≈ 1.67; FlopCounterMode's count is reported too,
   low on CPU: it misses the CPU attention kernel and the frozen encoder's eval-mode MHA fast path).
   Asserts that the frozen pre-trained encoder runs without autograd (no grad mode, outputs without
   grad_fn, parameters frozen and outside the optimiser).
3. data: a real fine-tune (``TaskDataModule`` on synthetic ``shapes`` rendered into a temporary cache,
   ``FineTune``, Trainer as above) for each loader setting; the train loader is wrapped to time every
   ``iter()``/``next()``. data-wait fraction = Σ next()/iter() time ÷ wall time of the timed steps.
   Settings (``--data-settings``): ``0`` (the embedded config's num_workers), ``1`` (one worker, loader
   rebuilt without persistent workers), ``1p`` (one persistent worker: what TaskDataModule does for
   num_workers > 0); a trailing ``r`` reads the raw dataset (``decode_cache=False``: PNG decode + PIL
   transform per image per step) instead of TaskDataModule's decoded uint8 cache, when the DataModule
   has that option. pin_memory follows TaskDataModule (on only with CUDA). Target: ≤ 0.05 per setting.

Writes JSON (--out) and a markdown table beside it (same name, .md).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TARGETS = {
    "framework": {"metric": "lightning_over_plain_steps_per_s", "op": ">=", "value": 0.95},
    "attack": {"metric": "badmerging_over_clean_step_time", "op": "<=", "value": 1.8},
    "data": {"metric": "data_wait_fraction", "op": "<=", "value": 0.05},
}
# The embedded recipe (configs/experiment/embedded_finetune.yaml); timing does not depend on it.
RECIPE = {"lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 30}
DEFAULT_CACHE = REPO_ROOT / ".cache" / "badmerging"


def _meets(part: str, value: float) -> bool:
    t = TARGETS[part]
    return value >= t["value"] if t["op"] == ">=" else value <= t["value"]


@contextlib.contextmanager
def _quiet():
    """Silence Lightning's info lines and the 'self.log without a trainer' warnings of plain loops."""
    loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "lightning.fabric")]
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


def make_batch(batch_size: int, image_size: int = 24, classes: int = 10, seed: int = 0):
    """(x (B, 3, S, S) ~ N(0, 1) — about the range of CLIP-normalised images, y (B,)) from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, image_size, image_size, generator=g), torch.randint(0, classes, (batch_size,), generator=g)


def _finetune(cache_dir, cls=None, **kwargs):
    from lightning_modules.finetune import FineTune

    cls = cls or FineTune
    return cls(task="shapes", cache_dir=str(cache_dir), **RECIPE, **kwargs)


def _trainer(max_steps: int, callbacks):
    return L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=max_steps, gradient_clip_val=1.0,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks)


def _optimiser(module, total_steps: int):
    """What ``FineTune.configure_optimizers`` builds (it needs a trainer for the step count)."""
    from lightning_modules.finetune import warmup_cosine

    params = [p for p in module.encoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
    warmup = min(RECIPE["warmup_steps"], max(1, total_steps // 2))
    return params, opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, total_steps))


class StepTimer(L.Callback):
    """perf_counter() after every optimiser step (on_train_batch_end)."""

    def __init__(self):
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ends.append(time.perf_counter())


class RepeatBatch:
    """An in-memory loader: the same batch ``n`` times (a plain list would be read as n dataloaders)."""

    def __init__(self, batch, n: int):
        self.batch, self.n = batch, n

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter([self.batch] * self.n)


def _rate(ends: list[float], warmup: int) -> float:
    """Steps per second over the steps after ``warmup``: (n − warmup) / (end_n − end_warmup)."""
    return (len(ends) - warmup) / (ends[-1] - ends[warmup - 1])


# ---------------------------------------------------------------------------------------------
# 1. framework overhead
# ---------------------------------------------------------------------------------------------
def lightning_steps_per_s(module, batch, steps: int, warmup: int) -> float:
    """Trainer.fit on the batch repeated warmup + steps times; steps/s from the step-end timestamps."""
    timer = StepTimer()
    with _quiet():
        _trainer(warmup + steps, [timer]).fit(module, train_dataloaders=RepeatBatch(batch, warmup + steps))
    return _rate(timer.ends, warmup)


def plain_steps_per_s(module, batch, steps: int, warmup: int, call_training_step: bool = False) -> float:
    """Plain loop: forward + CE (or ``module.training_step``), zero_grad, backward, clip 1.0, AdamW, LambdaLR."""
    clf = module.classifier.train()
    params, opt, sched = _optimiser(module, warmup + steps)
    ends = []
    with _quiet():
        for i in range(warmup + steps):
            x, y = batch
            if call_training_step:
                loss = module.training_step(batch, i)
            else:
                loss = F.cross_entropy(clf.logits(clf.features(x)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            ends.append(time.perf_counter())
    return _rate(ends, warmup)


def _abba(repeats: int, names: tuple[str, ...]):
    """Run order: forward on even repeats, reversed on odd (A B B A A B ...; A B C C B A ...)."""
    for r in range(repeats):
        yield r, (names if r % 2 == 0 else names[::-1])


def bench_framework(batch_size: int = 128, steps: int = 10, warmup: int = 2, repeats: int = 5,
                    cache_dir=DEFAULT_CACHE, decompose: bool = True) -> dict:
    """ratio = median over repeats of (Lightning steps/s ÷ plain steps/s), neighbouring runs paired."""
    batch = make_batch(batch_size)
    lit, plain = _finetune(cache_dir), _finetune(cache_dir)
    names = ("lightning", "plain", "module_step") if decompose else ("lightning", "plain")
    runs = {n: [] for n in names}
    for r, order in _abba(repeats, names):
        for name in order:
            if name == "lightning":
                runs[name].append(lightning_steps_per_s(lit, batch, steps, warmup))
            else:
                runs[name].append(plain_steps_per_s(plain, batch, steps, warmup, call_training_step=name == "module_step"))
        print(f"  framework repeat {r}: " + ", ".join(f"{n} {runs[n][-1]:.3f} steps/s" for n in names), flush=True)
    ratios = [a / b for a, b in zip(runs["lightning"], runs["plain"])]
    ratio = statistics.median(ratios)
    out = {
        "what": "Lightning Trainer steps/s ÷ plain-loop steps/s, same FineTune model and batch; "
                "Trainer with logger, checkpointing, progress bar and model summary off",
        "batch_size": batch_size, "steps": steps, "warmup": warmup, "repeats": repeats,
        "steps_per_s": {n: runs[n] for n in names},
        "median_steps_per_s": {n: statistics.median(v) for n, v in runs.items()},
        "ratios": ratios,
        "value": ratio,
        "target": TARGETS["framework"], "meets_target": _meets("framework", ratio),
    }
    if decompose:
        out["module_step_over_plain"] = statistics.median(a / b for a, b in zip(runs["module_step"], runs["plain"]))
        out["lightning_over_module_step"] = statistics.median(a / b for a, b in zip(runs["lightning"], runs["module_step"]))
    return out


# ---------------------------------------------------------------------------------------------
# 2. attack cost
# ---------------------------------------------------------------------------------------------
def make_trigger(directory: Path, size: int = 6) -> str:
    """A random 6 px patch (one token of badmerging-tiny) saved as a stage-1 trigger file."""
    import open_clip

    from datamodules.triggers import TriggerSpec, init_patch, save_trigger

    spec = TriggerSpec(kind="patch", size=size, seed=1)
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    path = Path(directory) / "trigger.safetensors"
    save_trigger(path, init_patch(spec, mean, std), spec, mean, std, {"stage": 1, "note": "train_bench random patch"})
    return str(path)


def module_step_time(module, batch, steps: int, warmup: int) -> float:
    """Seconds per step of the plain loop training_step → zero_grad → backward → clip 1.0 → AdamW → LambdaLR."""
    return 1.0 / plain_steps_per_s(module, batch, steps, warmup, call_training_step=True)


def step_flops(module, batch) -> int:
    """FLOPs of one training_step + backward, counted by torch.utils.flop_counter.FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with _quiet(), counter:
        module.training_step(batch, 0).backward()
    module.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def frozen_encoder_check(module, batch) -> dict:
    """Run one training_step with a forward hook on f_pre; report grad mode and its outputs' autograd state."""
    seen = []
    f_pre = module.pretrained_encoder()

    def hook(mod, inputs, output):
        seen.append({"grad_enabled": torch.is_grad_enabled(), "output_requires_grad": bool(output.requires_grad),
                     "output_has_grad_fn": output.grad_fn is not None})

    handle = f_pre.register_forward_hook(hook)
    try:
        with _quiet():
            loss = module.training_step(batch, 0)
    finally:
        handle.remove()
    trained = {id(p) for p in module.parameters()}
    check = {
        "frozen_forward_calls": len(seen),
        "grad_enabled_in_frozen_forward": any(s["grad_enabled"] for s in seen),
        "frozen_output_requires_grad": any(s["output_requires_grad"] for s in seen),
        "frozen_output_has_grad_fn": any(s["output_has_grad_fn"] for s in seen),
        "frozen_params_requiring_grad": sum(p.requires_grad for p in f_pre.parameters()),
        "frozen_params_in_module_parameters": sum(id(p) in trained for p in f_pre.parameters()),
        "trained_loss_has_grad_fn": loss.grad_fn is not None,
    }
    check["ok"] = (check["frozen_forward_calls"] >= 1 and not check["grad_enabled_in_frozen_forward"]
                   and not check["frozen_output_requires_grad"] and not check["frozen_output_has_grad_fn"]
                   and check["frozen_params_requiring_grad"] == 0 and check["frozen_params_in_module_parameters"] == 0
                   and check["trained_loss_has_grad_fn"])
    return check


def bench_attack(batch_size: int = 128, steps: int = 6, warmup: int = 2, repeats: int = 5,
                 cache_dir=DEFAULT_CACHE, workdir: Path | None = None) -> dict:
    """ratio = median over repeats of (BadMerging s/step ÷ clean s/step), neighbouring runs paired."""
    from lightning_modules.injection import BackdoorInjection

    batch = make_batch(batch_size)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        trigger = make_trigger(Path(tmp))
        clean = _finetune(cache_dir)
        attack = _finetune(cache_dir, cls=BackdoorInjection, attack="badmerging", trigger_path=trigger, target_class=1)
    check = frozen_encoder_check(attack, batch)
    if not check["ok"]:
        raise AssertionError(f"frozen pre-trained encoder runs with autograd: {check}")
    flops = {"clean": step_flops(clean, batch), "badmerging": step_flops(attack, batch)}
    runs = {"clean": [], "badmerging": []}
    for r, order in _abba(repeats, ("clean", "badmerging")):
        for name in order:
            runs[name].append(module_step_time(clean if name == "clean" else attack, batch, steps, warmup))
        print(f"  attack repeat {r}: clean {runs['clean'][-1] * 1e3:.1f} ms, badmerging {runs['badmerging'][-1] * 1e3:.1f} ms",
              flush=True)
    ratios = [b / c for b, c in zip(runs["badmerging"], runs["clean"])]
    ratio = statistics.median(ratios)
    n = int(0.5 * batch_size)
    return {
        "what": "BackdoorInjection(badmerging) s/step ÷ FineTune s/step, both plain loops over training_step, same batch",
        "batch_size": batch_size, "poisoned": n, "steps": steps, "warmup": warmup, "repeats": repeats,
        "seconds_per_step": runs,
        "median_ms_per_step": {k: 1e3 * statistics.median(v) for k, v in runs.items()},
        "ratios": ratios,
        "value": ratio,
        "flops_per_step": flops,
        "flop_ratio_counted": flops["badmerging"] / flops["clean"] if flops["clean"] else None,
        "flop_ratio_expected": ((batch_size + n) * 3 + n) / (batch_size * 3),
        "flop_count_note": "FlopCounterMode on CPU misses the CPU attention kernel and the in-projection inside the "
                           "eval-mode native MHA fast path that the frozen encoder takes, so the counted ratio reads low",
        "frozen_encoder": check,
        "target": TARGETS["attack"], "meets_target": _meets("attack", ratio),
    }


# ---------------------------------------------------------------------------------------------
# 3. data wait
# ---------------------------------------------------------------------------------------------
class TimedLoader:
    """Iterable over a DataLoader recording (start, end) of every iter() and next() call."""

    def __init__(self, loader, intervals: list):
        self.loader, self.intervals = loader, intervals

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        t0 = time.perf_counter()
        it = iter(self.loader)
        self.intervals.append((t0, time.perf_counter()))
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                self.intervals.append((t0, time.perf_counter()))
                return
            self.intervals.append((t0, time.perf_counter()))
            yield batch


def _timed_datamodule(persistent: bool | None, intervals: list, **kwargs):
    """TaskDataModule whose train loader is timed; persistent=False rebuilds it without persistent workers."""
    from torch.utils.data import DataLoader

    from datamodules.datamodule import TaskDataModule

    class Timed(TaskDataModule):
        def train_dataloader(self):
            loader = super().train_dataloader()
            if persistent is False and loader.num_workers > 0:
                loader = DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=True, drop_last=True,
                                    num_workers=loader.num_workers, persistent_workers=False,
                                    pin_memory=loader.pin_memory, generator=torch.Generator().manual_seed(self.hparams.seed))
            return TimedLoader(loader, intervals)

    return Timed(**kwargs)


def _has_decode_cache() -> bool:
    import inspect

    from datamodules.datamodule import TaskDataModule

    return "decode_cache" in inspect.signature(TaskDataModule.__init__).parameters


def parse_setting(text: str) -> tuple[int, bool, bool]:
    """'1p' → (1 worker, persistent, decoded cache); trailing 'r' → raw dataset (decode_cache=False)."""
    raw = text.endswith("r")
    text = text.rstrip("r")
    return int(text.rstrip("p")), text.endswith("p"), not raw


def data_wait(workers: int, persistent: bool, steps: int, warmup: int, batch_size: int, train_size: int,
              data_cache: Path, head_cache, decoded: bool = True) -> dict:
    """One fit; fraction = Σ overlap(next()/iter() intervals, timed window) ÷ timed window."""
    intervals: list[tuple[float, float]] = []
    extra = {"decode_cache": decoded} if _has_decode_cache() else {}
    dm = _timed_datamodule(persistent, intervals, task="shapes", batch_size=batch_size, num_workers=workers,
                           cache_dir=str(data_cache), synthetic_train_size=train_size,
                           synthetic_test_size=max(16, batch_size // 4), **extra)
    module = _finetune(head_cache)
    timer = StepTimer()
    with _quiet():
        _trainer(warmup + steps, [timer]).fit(module, datamodule=dm)
    lo, hi = timer.ends[warmup - 1], timer.ends[-1]
    wait = sum(max(0.0, min(b, hi) - max(a, lo)) for a, b in intervals)
    window = hi - lo
    n = len(timer.ends) - warmup
    return {"num_workers": workers, "persistent_workers": persistent and workers > 0,
            "decode_cache": extra.get("decode_cache"), "dataset": type(dm.train_dataloader().loader.dataset).__name__,
            "pin_memory": torch.cuda.is_available(), "batches_per_epoch": len(dm.splits["train"]) // batch_size,
            "steps": n, "steps_per_s": n / window, "wait_ms_per_step": 1e3 * wait / n,
            "compute_ms_per_step": 1e3 * (window - wait) / n, "value": wait / window,
            "meets_target": _meets("data", wait / window)}


def bench_data(settings=((0, False, True), (1, False, True), (1, True, True)), steps: int = 25, warmup: int = 2, batch_size: int = 128,
               train_size: int = 2560, cache_dir=DEFAULT_CACHE, workdir: Path | None = None) -> dict:
    """Data-wait fraction of a real fine-tune (TaskDataModule 'shapes' → FineTune → Trainer) per loader setting."""
    import datasets

    from datamodules.synthetic import synthetic_task_dir

    rows = []
    bars, tqdm_env = datasets.is_progress_bar_enabled(), os.environ.get("TQDM_DISABLE")
    datasets.disable_progress_bars()
    os.environ["TQDM_DISABLE"] = "1"  # the loader's "decode <task>/<split>" bar
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        t0 = time.perf_counter()
        synthetic_task_dir("shapes", tmp, train_size, max(16, batch_size // 4))  # render once, outside the timing
        render_s = time.perf_counter() - t0
        for workers, persistent, decoded in settings:
            row = data_wait(workers, persistent, steps, warmup, batch_size, train_size, Path(tmp), cache_dir, decoded)
            rows.append(row)
            print(f"  data workers={workers} persistent={row['persistent_workers']} decode_cache={row['decode_cache']} "
                  f"({row['dataset']}): wait {row['value']:.3f} "
                  f"({row['wait_ms_per_step']:.1f} ms / step of {1e3 / row['steps_per_s']:.1f})", flush=True)
    if bars:
        datasets.enable_progress_bars()
    if tqdm_env is None:
        os.environ.pop("TQDM_DISABLE", None)
    else:
        os.environ["TQDM_DISABLE"] = tqdm_env
    return {
        "what": "fraction of step wall time spent in the train loader's iter()/next(), real fine-tune through the Trainer",
        "task": "shapes", "train_size": train_size, "batch_size": batch_size, "steps": steps, "warmup": warmup,
        "render_seconds": render_s, "rows": rows,
        "target": TARGETS["data"], "meets_target": all(r["meets_target"] for r in rows),
    }


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_info(threads: int) -> dict:
    from modeling.version import code_version

    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs ({_cpu_name()})",
        "python": platform.python_version(), "torch": torch.__version__, "lightning": L.__version__,
        "threads": threads, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(), "load_average_start": list(os.getloadavg()),
    }


def markdown(report: dict) -> str:
    m = report["meta"]
    lines = ["# train_bench: framework overhead, attack cost, data wait (CPU)", "", f"`{report['command']}`", "",
             f"{m['machine']}; torch {m['torch']}, lightning {m['lightning']}; {m['threads']} torch thread(s); "
             f"{m['date']}; code {m['code_version']}; load average at start {m['load_average_start'][0]:.2f}, "
             f"at end {m['load_average_end'][0]:.2f}. Model badmerging-tiny, task shapes, CPU, float32.", "",
             "| measurement | value | target | met |", "|---|---:|---|---|"]
    parts = report["results"]
    if "framework" in parts:
        f = parts["framework"]
        lines.append(f"| framework: Lightning ÷ plain steps/s (batch {f['batch_size']}, median of {f['repeats']}) "
                     f"| {f['value']:.3f} | ≥ {f['target']['value']} | {f['meets_target']} |")
    if "attack" in parts:
        a = parts["attack"]
        lines.append(f"| attack: BadMerging ÷ clean s/step (batch {a['batch_size']}, median of {a['repeats']}) "
                     f"| {a['value']:.3f} | ≤ {a['target']['value']} | {a['meets_target']} |")
        lines.append(f"| attack: frozen encoder without autograd | {a['frozen_encoder']['ok']} | True | "
                     f"{a['frozen_encoder']['ok']} |")
    if "data" in parts:
        for r in parts["data"]["rows"]:
            lines.append(f"| data: wait fraction, num_workers {r['num_workers']}, persistent {r['persistent_workers']}, "
                         f"decode_cache {r['decode_cache']} "
                         f"| {r['value']:.3f} | ≤ {TARGETS['data']['value']} | {r['meets_target']} |")
    if "framework" in parts:
        f = parts["framework"]
        lines += ["", "Framework (steps/s per repeat; Trainer with logger, checkpointing, progress bar, model summary off):",
                  "", "| run | " + " | ".join(f"r{i}" for i in range(f["repeats"])) + " | median |",
                  "|---|" + "---:|" * (f["repeats"] + 1)]
        for name, values in f["steps_per_s"].items():
            lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {statistics.median(values):.3f} |")
        lines.append("| Lightning ÷ plain | " + " | ".join(f"{v:.3f}" for v in f["ratios"]) + f" | {f['value']:.3f} |")
        if "module_step_over_plain" in f:
            lines += ["", f"module_step = plain loop calling `FineTune.training_step` (metric update, finite check; no "
                          f"logging without a trainer): module_step ÷ plain {f['module_step_over_plain']:.3f}, "
                          f"Lightning ÷ module_step {f['lightning_over_module_step']:.3f}."]
    if "attack" in parts:
        a = parts["attack"]
        fr = f"{a['flop_ratio_counted']:.3f}" if a["flop_ratio_counted"] else "n/a"
        lines += ["", f"Attack: clean {a['median_ms_per_step']['clean']:.1f} ms/step, BadMerging "
                      f"{a['median_ms_per_step']['badmerging']:.1f} ms/step ({a['poisoned']} of {a['batch_size']} triggered); "
                      f"FLOP ratio counted {fr}, expected {a['flop_ratio_expected']:.3f}; per-repeat ratios "
                      + ", ".join(f"{v:.3f}" for v in a["ratios"]) + ".",
                  "", "Frozen encoder: " + ", ".join(f"{k} = {v}" for k, v in a["frozen_encoder"].items()) + "."]
    if "data" in parts:
        d = parts["data"]
        per_epoch = d["rows"][0]["batches_per_epoch"]
        epochs = (d["warmup"] + d["steps"] - 1) // max(1, per_epoch)
        lines += ["", f"Data: {d['train_size']} shapes renders (10% held out for val; {per_epoch} batches of "
                      f"{d['batch_size']} per epoch, so the {d['warmup']} + {d['steps']} steps start {epochs} new "
                      f"epoch(s)); wait = time inside the train loader's iter()/next(); render time "
                      f"{d['render_seconds']:.1f} s, not counted:", "",
                  "| num_workers | persistent | decode_cache | dataset | pin_memory | steps/s | wait ms/step "
                  "| compute ms/step | wait fraction |",
                  "|---:|---|---|---|---|---:|---:|---:|---:|"]
        for r in d["rows"]:
            lines.append(f"| {r['num_workers']} | {r['persistent_workers']} | {r['decode_cache']} | {r['dataset']} | "
                         f"{r['pin_memory']} | {r['steps_per_s']:.3f} | "
                         f"{r['wait_ms_per_step']:.1f} | {r['compute_ms_per_step']:.1f} | {r['value']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=["framework", "attack", "data"], default=["framework", "attack", "data"])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (same for every run)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="alternating repetitions per comparison")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per framework run")
    parser.add_argument("--attack-steps", type=int, default=6, help="timed steps per attack run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of every run")
    parser.add_argument("--data-steps", type=int, default=20)
    parser.add_argument("--data-train-size", type=int, default=2560, help="synthetic shapes train renders")
    parser.add_argument("--data-settings", nargs="+", default=["0", "1", "1p", "0r", "1pr"],
                        help="loader settings: N = N workers, Np = N persistent workers (TaskDataModule's own setting), "
                             "trailing r = decode_cache False")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="zero-shot head cache (read; written if missing)")
    parser.add_argument("--no-decompose", action="store_true", help="skip the module_step run in the framework part")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "train_bench.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    report = {"command": " ".join(["python benchmarks/train_bench.py", *(argv if argv is not None else sys.argv[1:])]),
              "meta": machine_info(args.threads), "targets": TARGETS, "results": {}}
    t0 = time.perf_counter()
    if "framework" in args.parts:
        print("framework overhead ...", flush=True)
        report["results"]["framework"] = bench_framework(args.batch_size, args.steps, args.warmup, args.repeats,
                                                         args.cache_dir, decompose=not args.no_decompose)
    if "attack" in args.parts:
        print("attack cost ...", flush=True)
        report["results"]["attack"] = bench_attack(args.batch_size, args.attack_steps, args.warmup, args.repeats,
                                                   args.cache_dir)
    if "data" in args.parts:
        print("data wait ...", flush=True)
        settings = [parse_setting(s) for s in args.data_settings]
        report["results"]["data"] = bench_data(settings, args.data_steps, max(1, args.warmup), args.batch_size,
                                               args.data_train_size, args.cache_dir)
    report["meta"]["load_average_end"] = list(os.getloadavg())
    report["meta"]["seconds"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
