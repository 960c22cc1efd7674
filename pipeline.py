"""The main job: the embedded default, end to end, offline, on a laptop CPU.

    python pipeline.py                       # base model -> clean fine-tunes -> zero-shot -> TA over λ -> table
    python pipeline.py --quick               # a reduced run (tests, smoke checks)

Steps: (1) the embedded base model (shipped in modeling/weights/, rebuilt by ``python -m
modeling.pretrain`` if missing); (2) a clean fine-tune of every synthetic task through ``train.py fit``
(the same LightningCLI, config ``configs/experiment/embedded_finetune.yaml``), cached by recipe so a
rerun skips them; (3) ``merge.py`` logic: zero-shot, individual, and Task Arithmetic over λ, written to
``<out_dir>/results.json``, ``results.csv`` and printed as a table. The last line printed is the path
of results.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_TASKS = ["shapes", "digits", "textures", "colours"]
DEFAULT_COEFFICIENTS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
FINETUNE_CONFIG = "configs/experiment/embedded_finetune.yaml"
METHODS_CONFIG = "configs/merge/embedded_methods.yaml"


def finetune(task: str, out_dir: Path, cache_dir: str, overrides: list[str]) -> Path:
    """Fine-tune on ``task`` through train.py's LightningCLI unless an identical run was exported already."""
    import train
    from merging.io import load_metadata
    from datamodules.synthetic import TASK_VERSIONS
    from modeling.clip import EMBEDDED_WEIGHTS, _sha256

    args = ["--config", FINETUNE_CONFIG, "--data.task", task, "--model.cache_dir", cache_dir, *overrides]
    key = hashlib.sha256(json.dumps([args, _sha256(EMBEDDED_WEIGHTS), Path(FINETUNE_CONFIG).read_text(), TASK_VERSIONS.get(task)]).encode()).hexdigest()[:16]
    target = out_dir / "models" / f"{task}.safetensors"
    meta = load_metadata(target) if target.exists() else None
    if meta and meta.get("pipeline_key") == key:
        print(f"[pipeline] {task}: cached fine-tune {target}", flush=True)
        return target
    root = out_dir / "finetune" / task
    t0 = time.time()
    cli = train.main(["fit", *args, "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
                      "--trainer.enable_progress_bar", "false" if os.environ.get("CI") else "true"])
    from callbacks.export import ExportEncoder
    from merging.io import load_state_dict, save_state_dict

    written = next(cb.written for cb in cli.trainer.callbacks if isinstance(cb, ExportEncoder))
    meta = load_metadata(written)
    meta.update(pipeline_key=key, seconds=round(time.time() - t0, 1))
    save_state_dict(target, load_state_dict(written), meta)
    print(f"[pipeline] {task}: fine-tuned in {time.time() - t0:.0f}s -> {target}", flush=True)
    return target


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out_dir", default="outputs/default")
    p.add_argument("--cache_dir", default=".cache/badmerging")
    p.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS)
    p.add_argument("--coefficients", nargs="+", type=float, default=DEFAULT_COEFFICIENTS)
    p.add_argument("--quick", action="store_true", help="reduced run: few steps, small data (for tests)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--methods", choices=["all", "ta"], default="all",
                   help=f"all: TA over λ plus every method of {METHODS_CONFIG}; ta: the TA curve only")
    a, extra = p.parse_known_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    from modeling.clip import EMBEDDED_WEIGHTS

    t0 = time.time()
    out_dir = Path(a.out_dir)
    if not EMBEDDED_WEIGHTS.exists():
        from modeling.pretrain import pretrain

        print(f"[pipeline] building the embedded base model -> {EMBEDDED_WEIGHTS}", flush=True)
        pretrain(EMBEDDED_WEIGHTS)
    overrides = list(extra)
    synth = []
    if a.quick:
        overrides += ["--trainer.max_steps", "6", "--trainer.val_check_interval", "3", "--data.synthetic_train_size", "600",
                      "--data.synthetic_test_size", "100", "--data.batch_size", "32"]
        synth = ["--synthetic_test_size", "100"]
    models = [finetune(t, out_dir, a.cache_dir, overrides) for t in a.tasks]

    import merge

    import yaml

    plan = [{"name": "task_arithmetic", "method": "task_arithmetic", "coefficients": a.coefficients}]
    if a.methods == "all":
        plan += yaml.safe_load(Path(METHODS_CONFIG).read_text())["plan"]
        if a.quick:  # every method, but small grids and few steps
            for e in plan[1:]:
                e["coefficients"] = e.get("coefficients", [None])[:2]
                if e["method"] == "adamerging":
                    e["hparams"]["steps"] = 2
                if e["method"] == "regmean":
                    e["hparams"]["gram_batches"] = 1
            synth += ["--val_max_examples", "20", "--gram_batch_size", "16"]
    merge_args = ["--models", *map(str, models), "--out_dir", str(out_dir), "--cache_dir", a.cache_dir,
                  "--plan", json.dumps(plan), *synth]
    cfg = merge.build_parser().parse_args(merge_args)
    results = merge.run(cfg)
    print(f"[pipeline] done in {time.time() - t0:.0f}s", flush=True)
    print(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
