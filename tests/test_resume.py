"""Crash and resume: a fine-tune killed with SIGKILL mid-epoch and resumed from its last checkpoint ends with
exactly the weights of an uninterrupted run (deterministic CPU mode); the data order survives checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from datamodules.resumable import ResumableDataLoader, make_resumable
from merging.io import load_metadata, load_state_dict

ROOT = Path(__file__).resolve().parents[1]

STALL_CALLBACK = '''
import time
from pathlib import Path

from lightning.pytorch import Callback


class StallAfter(Callback):
    """Marks a file and hangs once ``step`` optimizer steps are done: the test then kills the process."""

    def __init__(self, step: int = 5, marker: str = "stalled"):
        super().__init__()
        self.step, self.marker = step, marker

    def on_train_batch_end(self, trainer, *args, **kwargs):
        if trainer.global_step >= self.step:
            Path(self.marker).write_text(str(trainer.global_step))
            time.sleep(600)
'''


def _config(tmp_path: Path, cache: str, stall_marker: Path | None = None) -> Path:
    """The embedded fine-tune at toy size: 8 steps of 16 images (14 batches per epoch), a checkpoint every 2 steps."""
    cfg = yaml.safe_load((ROOT / "configs/experiment/embedded_finetune.yaml").read_text())
    cfg["trainer"].update(max_steps=8, deterministic=True, limit_val_batches=0, num_sanity_val_steps=0,
                          enable_progress_bar=False, log_every_n_steps=1)
    cfg["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 2
    if stall_marker is not None:
        cfg["trainer"]["callbacks"].append({"class_path": "stall_callback.StallAfter",
                                            "init_args": {"step": 5, "marker": str(stall_marker)}})
    cfg["model"]["init_args"]["cache_dir"] = cache
    cfg["data"].update(synthetic_train_size=256, synthetic_test_size=32, batch_size=16)
    path = tmp_path / ("stall.yaml" if stall_marker else "tiny.yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fit(config: Path, root: Path, tmp_path: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]), "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    args = [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(config), "--trainer.default_root_dir", str(root),
            "--trainer.logger.init_args.save_dir", str(root), *extra]
    log = open(tmp_path / f"{root.name}-{len(list(tmp_path.glob('*.log')))}.log", "w")
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait(proc: subprocess.Popen, tmp_path: Path, timeout: float = 240) -> None:
    rc = proc.wait(timeout=timeout)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted(tmp_path.glob("*.log")))
    assert rc == 0, logs


def test_sigkill_mid_epoch_then_resume_gives_identical_weights(tmp_path, session_cache, base):
    (tmp_path / "stall_callback.py").write_text(STALL_CALLBACK)
    # Render the tiny task once in this process (shared cache), so that both runs start at the same time.
    from datamodules.datamodule import TaskDataModule

    TaskDataModule(task="shapes", cache_dir=session_cache, synthetic_train_size=256, synthetic_test_size=32).prepare_data()

    marker = tmp_path / "stalled"
    straight = _fit(_config(tmp_path, session_cache), tmp_path / "straight", tmp_path)
    crashing = _fit(_config(tmp_path, session_cache, marker), tmp_path / "crashed", tmp_path)
    deadline = time.time() + 240
    while not marker.exists():
        assert crashing.poll() is None and time.time() < deadline, "the run to be killed ended or hung early"
        time.sleep(0.2)
    last = next((tmp_path / "crashed").rglob("last.ckpt"))
    at_kill = torch.load(last, map_location="cpu", weights_only=True)
    assert at_kill["global_step"] == 4 and marker.read_text() == "5"  # step 5 done, its work not in any checkpoint
    os.kill(crashing.pid, signal.SIGKILL)
    assert crashing.wait(timeout=60) == -signal.SIGKILL
    assert not list((tmp_path / "crashed").rglob("encoder.safetensors"))

    # `--ckpt_path last`, as the README says: the newest last.ckpt of this run's logger (version_0, not the new version_1)
    resumed = _fit(_config(tmp_path, session_cache), tmp_path / "crashed", tmp_path, "--ckpt_path", "last")
    _wait(resumed, tmp_path)
    _wait(straight, tmp_path)
    assert f"train.py: resuming from {last}" in "".join(p.read_text() for p in tmp_path.glob("crashed-*.log"))

    reference = load_state_dict(next((tmp_path / "straight").rglob("encoder.safetensors")))
    [after_resume] = [p for p in (tmp_path / "crashed").rglob("encoder.safetensors")]
    got = load_state_dict(after_resume)
    assert load_metadata(after_resume)["global_step"] == 8
    assert got.keys() == reference.keys()
    differing = [k for k in reference if not torch.equal(got[k], reference[k])]
    assert not differing, f"{len(differing)} tensors differ after the resume, e.g. {differing[:3]}"
    theta_pre = base.encoder_state_dict()
    assert any(not torch.equal(got[k], v) for k, v in theta_pre.items())  # it did train


# -- the resumable data order, without Lightning ----------------------------------------------------
def _loader(seed: int = 0) -> DataLoader:
    data = TensorDataset(torch.arange(23))
    return DataLoader(data, batch_size=4, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(seed))


def _epochs(loader, n: int) -> list[list[list[int]]]:
    return [[b[0].tolist() for b in loader] for _ in range(n)]


def test_resumable_loader_keeps_the_plain_loaders_order():
    consumed = {"n": 0}
    resumable = make_resumable(_loader(), lambda: consumed["n"])
    assert isinstance(resumable, ResumableDataLoader)
    assert _epochs(resumable, 3) == _epochs(_loader(), 3)


@pytest.mark.parametrize("epoch,done", [(0, 0), (0, 1), (0, 3), (1, 2), (1, 4), (2, 4), (0, -1), (1, -1)])
def test_resumable_loader_state_restores_the_exact_batches(epoch, done):
    reference = _epochs(_loader(), 4)  # 5 batches per epoch
    consumed = {"n": 0}
    first = make_resumable(_loader(), lambda: consumed["n"])
    for e in range(epoch):
        list(first)
    it = iter(first)
    for _ in range(5 if done < 0 else done):
        next(it)
    consumed["n"] = done  # -1: the epoch is complete
    if done < 0 and epoch == 1:
        list(it)  # Lightning's prefetch exhausts the iterator before the last batch's checkpoint
    state = first.state_dict()
    list(it)

    second = make_resumable(_loader(), lambda: 0)  # a fresh process: same seed, then the checkpoint
    second.load_state_dict(state)
    start_epoch, skip = (epoch + 1, 0) if done < 0 else (epoch, done)
    rest = [b[0].tolist() for b in second]
    assert rest == reference[start_epoch][skip:]
    assert _epochs(second, 4 - start_epoch - 1) == reference[start_epoch + 1:]


def test_resumable_loader_state_before_any_iteration():
    reference = _epochs(_loader(), 2)
    state = make_resumable(_loader(), lambda: 0).state_dict()
    second = make_resumable(_loader(), lambda: 0)
    second.load_state_dict(state)
    assert _epochs(second, 2) == reference


def test_other_loaders_are_left_alone():
    data = TensorDataset(torch.arange(8))
    unseeded = DataLoader(data, batch_size=2, shuffle=True)  # global RNG: nothing to restore
    assert make_resumable(unseeded, None) is unseeded
    no_batching = DataLoader(data, batch_size=None)
    assert make_resumable(no_batching, None) is no_batching
