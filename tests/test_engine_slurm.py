"""A spec run as submitit job arrays on the real local SLURM, one training requeued mid-run (submitit's time-out
signal, then a resume from its Lightning checkpoint), ends with the same table as the same spec run locally.

Skipped, with the reason, only where SLURM cannot be installed or started (see tests/test_slurm.py).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import yaml

from experiments.executors import LocalExecutor, SubmititExecutor
from experiments.graph import RunOptions
from experiments.run import run_experiment
from experiments.spec import parse_spec

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--data.synthetic_train_size", "600", "--data.synthetic_test_size", "100", "--data.batch_size", "16",
         "--trainer.enable_progress_bar", "false"]


def _spec():
    """Two tasks, BadNets on shapes trained 130 steps (so a checkpoint at step 100 exists to resume from)."""
    data = {
        "name": "slurm_small", "tasks": ["shapes", "digits"],
        "finetune": {"configs": ["configs/experiment/embedded_finetune.yaml"],
                     "overrides": ["--trainer.max_steps", "4", "--trainer.val_check_interval", "4", *SMALL]},
        "trainings": [{"name": "attack_badnets", "task": "shapes",
                       "configs": ["configs/experiment/embedded_injection.yaml", "configs/attack/embedded_badnets.yaml"],
                       "overrides": ["--trainer.max_steps", "130", "--trainer.val_check_interval", "130", *SMALL]}],
        "attacks": [{"name": "badnets", "training": "attack_badnets"}],
        "scenarios": [{"name": "clean", "models": "clean", "probe_attacks": True,
                       "plan": [{"name": "task_arithmetic", "method": "task_arithmetic", "coefficients": [0.3]}]},
                      {"name": "attacked", "models": "attack", "zero_shot": False,
                       "plan": [{"name": "task_arithmetic", "method": "task_arithmetic", "coefficients": [0.3]}]}],
        "evaluation": {"synthetic_train_size": 600, "synthetic_test_size": 100, "val_max_examples": 20},
    }
    return parse_spec(yaml.safe_load(yaml.safe_dump(data)), "test spec")


def _interrupt_after_checkpoint(cache: Path, key: str, interrupted: list):
    """On the first wave: once the BadNets training has written its step-100 checkpoint, send its SLURM job
    submitit's time-out signal (USR2), as SLURM does before a time limit."""

    def on_submit(wave, jobs):
        if wave != 0:
            return

        def watch():
            work = cache / "artifacts" / ".work" / key
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and not any(work.rglob("last.ckpt")):
                time.sleep(0.2)
            job = next(j for j in jobs if j.job_id.endswith("_2"))  # the array's third task: attack_badnets
            job._interrupt(timeout=True)
            interrupted.append(job.job_id)

        threading.Thread(target=watch, daemon=True).start()

    return on_submit


def _rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())["rows"]


def test_spec_on_slurm_with_a_requeued_training_equals_the_local_run(slurm, tmp_path, session_cache):
    spec = _spec()
    local = run_experiment(spec, RunOptions(out_dir=str(tmp_path / "local"), cache_dir=str(tmp_path / "c_local"),
                                            progress=False), LocalExecutor(1), report=False)

    cache = tmp_path / "c_slurm"
    options = RunOptions(out_dir=str(tmp_path / "slurm"), cache_dir=str(cache), progress=False)
    from experiments.graph import build_graph

    key = build_graph(spec, options)["train:attack_badnets"].key
    interrupted: list[str] = []
    executor = SubmititExecutor(tmp_path / "submitit", timeout_min=30, cpus_per_task=1,
                                on_submit=_interrupt_after_checkpoint(cache, key, interrupted))
    remote = run_experiment(spec, options, executor, report=False)

    assert interrupted, "the BadNets training was never interrupted"
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "submitit").rglob("*_log.*")))
    assert "Exiting gracefully after preemption/timeout" in logs, logs[-3000:]  # submitit checkpointed and requeued
    assert "Restoring states from the checkpoint path" in logs and "last.ckpt" in logs, logs[-3000:]  # and it resumed
    assert _rows(remote) == _rows(local)
