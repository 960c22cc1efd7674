"""A real single-node SLURM on this machine (``scripts/slurm/start_local_slurm.sh``: slurmctld + slurmd as root).

1. ``sbatch scripts/slurm/cpu_ddp.sbatch`` (single_node.sbatch's mechanics, 2 CPU tasks): a DDP fine-tune started
   by ``srun``, whose exported encoder, metrics, config and TensorBoard events land in the job's run dir.
2. The same job, sent the requeue signal mid-run (``scancel --signal=USR1``, as ``--signal=SIGUSR1@90`` would):
   it writes Lightning's hpc checkpoint, requeues itself, restarts under the same job id and run dir, resumes
   from that checkpoint and ends with the uninterrupted run's metrics and bit-identical weights.

Skipped, with the reason, only where SLURM cannot be installed or started (not root, no apt-get, ...).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from merging.io import load_metadata, load_state_dict

ROOT = Path(__file__).resolve().parents[1]
TRAIN_ARGS = ["--config", "configs/experiment/embedded_finetune.yaml", "--data.task", "shapes",
              "--trainer.max_steps", "8", "--trainer.val_check_interval", "8", "--trainer.num_sanity_val_steps", "0",
              "--trainer.enable_progress_bar", "false", "--data.synthetic_train_size", "210",
              "--data.synthetic_test_size", "40", "--data.batch_size", "16", "--data.eval_batch_size", "8"]
# 210 renders -> 189 train -> 95 per rank -> 5 batches of 16 per epoch: 8 steps cross an epoch boundary
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}

STALL_FOR_REQUEUE = '''
import os
import time
from pathlib import Path

from lightning.pytorch import Callback


class StallForRequeue(Callback):
    """First start of a job only: at step ``step`` write ``marker`` and hold the batch end until the requeue
    signal has been noted (train.py's SLURMRequeue acts on it at this same batch end), at most 120 s."""

    def __init__(self, step: int = 3, marker: str = "stalled"):
        super().__init__()
        self.step, self.marker = step, marker

    def on_train_batch_end(self, trainer, *args, **kwargs):
        if os.environ.get("SLURM_RESTART_COUNT", "0") != "0" or trainer.global_step != self.step:
            return
        requeue = next(c for c in trainer.callbacks if type(c).__name__ == "SLURMRequeue")
        if trainer.is_global_zero:
            Path(self.marker).write_text(str(trainer.global_step))
        deadline = time.monotonic() + 120
        while not requeue.requested and time.monotonic() < deadline:
            time.sleep(0.1)
'''


def _job(job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def _wait(job: str, until, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = _job(job)
        if until(info):
            return info
        assert time.monotonic() < deadline, f"job {job}: not {what} after {timeout:.0f} s: {info.get('JobState')}"
        time.sleep(0.5)


def _submit(tmp: Path, cache: str, *extra: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp), str(ROOT)]), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable, "RUN_ROOT": str(tmp)}
    done = subprocess.run(["sbatch", "--parsable", "--chdir", str(ROOT), "--output", str(tmp / "%j.out"),
                           "--export", "ALL", "scripts/slurm/cpu_ddp.sbatch", *TRAIN_ARGS,
                           "--model.init_args.cache_dir", cache, *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def _cancel_on_failure(request, job: str) -> None:
    def cancel():
        if _job(job).get("JobState") not in FINAL:
            subprocess.run(["scancel", job], capture_output=True)
    request.addfinalizer(cancel)


@pytest.fixture(scope="module")
def uninterrupted(slurm, tmp_path_factory, session_cache, request):
    """The 2-task DDP fine-tune, submitted with sbatch and run to the end: (run dir, job id, log, wall seconds)."""
    tmp = tmp_path_factory.mktemp("slurm_straight")
    start = time.monotonic()
    job = _submit(tmp, session_cache)
    _cancel_on_failure(request, job)
    info = _wait(job, lambda i: i.get("JobState") in FINAL, 300, "finished")
    wall = time.monotonic() - start
    log = (tmp / f"{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    return tmp / f"badmerging-cpu-{job}", job, log, wall


def test_sbatch_ddp_finetune_end_to_end(uninterrupted, base):
    run_dir, job, log, wall = uninterrupted
    print(f"SLURM-TIME end-to-end job: {wall:.1f} s")
    assert "Starting with 2 processes" in log and "SLURM auto-requeueing enabled" in log
    assert f"job {job} start 0" in log
    [log_dir] = [p for p in run_dir.glob("*/*") if p.is_dir()]  # one logger version: <run dir>/embedded_shapes/version_0
    assert log_dir.relative_to(run_dir).as_posix() == "embedded_shapes/version_0"
    export = log_dir / "encoder.safetensors"
    meta = load_metadata(export)
    assert meta["kind"] == "finetune" and meta["task"] == "shapes" and meta["global_step"] == 8
    assert meta["metrics"]["val/acc_total"] == 21 and 0 <= meta["metrics"]["val/acc_hits"] <= 21
    weights = load_state_dict(export)
    assert any(not torch.equal(weights[k], v) for k, v in base.encoder_state_dict().items())  # it trained
    config = yaml.safe_load((log_dir / "config.yaml").read_text())
    trainer = config["trainer"]
    # devices came from $SLURM_NTASKS_PER_NODE on the command line (a string to jsonargparse)
    assert (trainer["strategy"], str(trainer["devices"]), trainer["num_nodes"], trainer["accelerator"]) == ("ddp", "2", 1, "cpu")
    assert trainer["default_root_dir"] == str(run_dir)
    assert (log_dir / "checkpoints" / "last.ckpt").exists() and list(log_dir.glob("events.out.tfevents.*"))
    assert not list(run_dir.glob("hpc_ckpt_*.ckpt"))  # nothing asked for a requeue


def test_requeue_signal_checkpoints_requeues_resumes_and_matches(uninterrupted, tmp_path, session_cache, request):
    straight_dir, _, _, _ = uninterrupted
    (tmp_path / "stall_for_requeue.py").write_text(STALL_FOR_REQUEUE)
    marker = tmp_path / "stalled"
    start = time.monotonic()
    job = _submit(tmp_path, session_cache, "--trainer.callbacks+", "stall_for_requeue.StallForRequeue",
                  "--trainer.callbacks.marker", str(marker))
    _cancel_on_failure(request, job)
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert _job(job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), (tmp_path / f"{job}.out").read_text()[-3000:]
        assert time.monotonic() < deadline, "the job did not reach step 3"
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
    # Lightning's handler runs `scontrol requeue`: the job is killed and pending again, restarted once
    _wait(job, lambda i: i.get("Restarts") == "1" and i.get("JobState") in {"PENDING", "RUNNING"} | FINAL, 120,
          "requeued")
    # SLURM holds a requeued batch job for ~2 min (its EligibleTime); let it start at once
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True, timeout=30)
    info = _wait(job, lambda i: i.get("JobState") in FINAL, 300, "finished")
    wall = time.monotonic() - start
    log = (tmp_path / f"{job}.out").read_text()
    print(f"SLURM-TIME requeue job (stall at step 3, requeue, resume): {wall:.1f} s")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", log[-4000:]

    run_dir = tmp_path / f"badmerging-cpu-{job}"
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    assert torch.load(hpc, map_location="cpu", weights_only=True)["global_step"] == 3  # checkpointed at the signal
    assert "train.py: requeue signal: checkpoint at step 3" in log and f"Requeued SLURM job: {job}" in log
    assert f"job {job} start 0" in log and f"job {job} start 1" in log  # one log, appended across the requeue
    assert f"train.py: resuming from {hpc}" in log  # the restart found it (--ckpt_path last)
    [log_dir] = [p for p in run_dir.glob("*/*") if p.is_dir()]  # the same version dir before and after
    assert len(list(log_dir.glob("events.out.tfevents.*"))) >= 2  # TensorBoard: both starts wrote to it

    export, reference = log_dir / "encoder.safetensors", straight_dir / "embedded_shapes/version_0/encoder.safetensors"
    meta, expected = load_metadata(export), load_metadata(reference)
    assert meta["global_step"] == 8
    print(f"SLURM requeued run metrics {meta['metrics']}")
    assert meta["metrics"] == expected["metrics"]
    got, want = load_state_dict(export), load_state_dict(reference)
    assert [k for k in want if not torch.equal(got[k], want[k])] == []  # bit-identical weights
