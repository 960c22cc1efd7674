"""Evaluation cost: clean accuracy + ASR / RA / clean-to-target in one pass vs the two bare forwards.

    python benchmarks/eval_bench.py                       # embedded model, shapes test split (1000 images)
    python benchmarks/eval_bench.py --repeats 9 --out benchmarks/results

``evaluation.evaluate.evaluate`` measures a task's clean accuracy and one trigger's ASR, RA and
clean-to-target rate from one encoder pass per batch over [x; trigger(x)], on inputs decoded and
transformed once (``load_eval_tasks``). The least any implementation must do is two encoder forwards
per image, clean and triggered; the baseline times exactly that (``encoder(x)``, ``encoder(x_bd)``,
no metrics) on the same in-memory batches, alternated with the real call (A B B A ...):

    ratio = median over repeats of  t(evaluate with one probe) / t(two bare forwards)      target ≤ 1.1

It also records what one more merge coefficient costs: a second ``evaluate`` on the same ``EvalTask``
reuses its decoded batches and zero-shot head (no decode, no text tower), so that cost is the
forwards alone. Writes ``eval_bench.json`` and ``eval_bench.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def bare_forwards(encoder, task, probe) -> None:
    with torch.no_grad():
        for x, _ in task.batches:
            encoder(x)
            encoder(probe_input(x, probe))


def probe_input(x, probe):
    from datamodules.triggers import apply_trigger

    return apply_trigger(x, probe.trigger, probe.spec)


def run(task_name: str = "shapes", repeats: int = 5, threads: int = 1, cache_dir: str = ".cache/badmerging",
        test_size: int = 1000, out: Path | None = None, train_size: int = 40000) -> dict:
    from datamodules.triggers import TriggerSpec, init_patch
    from evaluation.evaluate import AttackProbe, evaluate, load_eval_tasks
    from modeling.clip import load_base_model
    from modeling.version import code_version

    torch.set_num_threads(threads)
    base = load_base_model()
    t0 = time.perf_counter()
    tasks = load_eval_tasks([task_name], base, cache_dir=cache_dir, synthetic_test_size=test_size,
                            synthetic_train_size=train_size)
    decode_s = time.perf_counter() - t0
    task = tasks[task_name]
    spec = TriggerSpec(kind="patch", size=6, seed=0)
    probe = AttackProbe("bench", init_patch(spec, base.mean, base.std), spec, task_name, 1, {"name": "badnets"})
    encoder = base.model.visual.eval()
    evaluate(encoder, tasks, [probe])  # warm-up (allocator, kernels)
    bare_forwards(encoder, task, probe)
    times = {"evaluate": [], "bare": []}
    for i in range(repeats):
        order = ("evaluate", "bare") if i % 2 == 0 else ("bare", "evaluate")
        for name in order:
            start = time.perf_counter()
            if name == "evaluate":
                evaluate(encoder, tasks, [probe])
            else:
                bare_forwards(encoder, task, probe)
            times[name].append(time.perf_counter() - start)
    ratios = [e / b for e, b in zip(times["evaluate"], times["bare"])]
    ratio = statistics.median(ratios)
    report = {
        "benchmark": "eval_bench", "command": " ".join(["python", "benchmarks/eval_bench.py", *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads() and __import__("os").cpu_count(),
                    "threads": threads, "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "code_version": code_version(),
        "task": task_name, "images": task.size, "repeats": repeats,
        "decode_once_seconds": decode_s,
        "seconds": {k: statistics.median(v) for k, v in times.items()}, "per_repeat_ratio": ratios,
        "ratio": ratio, "target": 1.1, "met": ratio <= 1.1,
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval_bench.json").write_text(json.dumps(report, indent=2) + "\n")
        md = [
            "# eval_bench: clean accuracy + ASR/RA/clean-to-target in one pass vs two bare forwards", "",
            f"`{report['command']}` — {report['machine']['platform']}, torch {torch.__version__}, {threads} thread(s), "
            f"{report['date']}, code {report['code_version']}", "",
            "| measurement | value | target | met |", "|---|---:|---|---|",
            f"| evaluate(1 probe) ÷ two bare forwards ({task.size} images of {task_name}, median of {repeats}) "
            f"| {ratio:.3f} | ≤ 1.1 | {report['met']} |",
            f"| evaluate, s | {report['seconds']['evaluate']:.3f} | | |",
            f"| two bare forwards, s | {report['seconds']['bare']:.3f} | | |",
            f"| decode + transform once (load_eval_tasks), s | {decode_s:.3f} | paid once per task, not per coefficient | |",
        ]
        (out / "eval_bench.md").write_text("\n".join(md) + "\n")
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="shapes")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--test_size", type=int, default=1000)
    p.add_argument("--cache_dir", default=".cache/badmerging")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    a = p.parse_args(argv)
    report = run(a.task, a.repeats, a.threads, a.cache_dir, a.test_size, a.out)
    print(json.dumps({k: report[k] for k in ("ratio", "target", "met", "seconds")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
