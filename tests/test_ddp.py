"""DDP on CPU with 2 processes (gloo), through ``train.py fit --config ... --config configs/trainer/ddp_cpu.yaml``
(Lightning starts the second process, as a user's run does): clean fine-tune, BadNets injection and stage-1 trigger
generation train, and their val CA / ASR / RA / clean-to-target counts equal a single-process evaluation of the
same weights; AdaMerging trains under DDP with λ in step on both ranks; the DDP train loader resumes mid-epoch.

The val split has 21 examples (odd): a padding sampler would count one of them twice on 2 processes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from datamodules.datamodule import TaskDataModule
from datamodules.resumable import ResumableDistributedDataLoader, make_resumable
from merging.io import load_metadata, load_state_dict

ROOT = Path(__file__).resolve().parents[1]
DATA = dict(synthetic_train_size=210, synthetic_test_size=40)  # val = 10% of 210 = 21
VAL_SIZE = 21
TINY = ["--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--trainer.enable_progress_bar", "false",
        "--trainer.num_sanity_val_steps", "0", "--data.synthetic_train_size", "210", "--data.synthetic_test_size", "40",
        "--data.batch_size", "16", "--data.eval_batch_size", "8"]


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]), "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}


def _train_ddp(tmp_path: Path, cache: str, configs: list[str], *extra: str) -> tuple[Path, str]:
    """``train.py fit`` with the given configs + ddp_cpu.yaml at toy size; returns (log dir, output)."""
    root = tmp_path / "run"
    args = [sys.executable, "train.py", "fit", *[a for c in configs for a in ("--config", c)],
            "--config", "configs/trainer/ddp_cpu.yaml", "--model.init_args.cache_dir", cache,
            "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root), *TINY, *extra]
    done = subprocess.run(args, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "Starting with 2 processes" in output  # really two processes
    [log_dir] = {p.parent for p in root.rglob("config.yaml")}
    return log_dir, output


def _validate_single(model: L.LightningModule, cache: str) -> dict:
    """Validation metrics of ``model`` in this process, one device, one batch of the whole val split."""
    data = TaskDataModule(task="shapes", cache_dir=cache, batch_size=16, eval_batch_size=500, **DATA)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    [metrics] = trainer.validate(model, datamodule=data, verbose=False)
    return metrics


def _model_args(*configs: str) -> dict:
    """``model.init_args`` merged over the given config files (later files win)."""
    args: dict = {}
    for config in configs:
        args.update((yaml.safe_load((ROOT / config).read_text()).get("model") or {}).get("init_args") or {})
    return args


def test_clean_finetune_under_ddp_counts_equal_one_process(tmp_path, session_cache, base):
    from lightning_modules.finetune import FineTune

    log_dir, _ = _train_ddp(tmp_path, session_cache, ["configs/experiment/embedded_finetune.yaml"])
    export = log_dir / "encoder.safetensors"
    meta = load_metadata(export)
    assert meta["global_step"] == 4 and (log_dir / "checkpoints" / "last.ckpt").exists()
    weights = load_state_dict(export)
    assert any(not torch.equal(weights[k], v) for k, v in base.encoder_state_dict().items())  # it trained
    ddp = meta["metrics"]  # the val epoch at the last step, on 2 processes (unpadded shards, 8 per batch)
    assert ddp["val/acc_total"] == VAL_SIZE  # each val image once: no padding duplicate

    model = FineTune(task="shapes", cache_dir=session_cache)
    model.encoder.load_state_dict(weights)
    single = _validate_single(model, session_cache)
    print(f"DDP-CHECK finetune: 2 processes {ddp['val/acc_hits']:.0f}/{ddp['val/acc_total']:.0f} "
          f"(acc {ddp['val/acc']:.6f}), 1 process {single['val/acc_hits']:.0f}/{single['val/acc_total']:.0f} "
          f"(acc {single['val/acc']:.6f})")
    for key in ("val/acc_hits", "val/acc_total", "val/acc"):
        assert ddp[key] == single[key], key
    assert math.isclose(ddp["val/loss"], single["val/loss"], rel_tol=1e-5)  # a mean weighted by shard sizes


def test_badnets_injection_under_ddp_counts_equal_one_process(tmp_path, session_cache):
    from lightning_modules.injection import BackdoorInjection

    configs = ["configs/experiment/embedded_injection.yaml", "configs/attack/embedded_badnets.yaml"]
    # lr 1e-4: at the recipe's 1e-3, 4 steps collapse every prediction onto the target (a weaker check)
    log_dir, _ = _train_ddp(tmp_path, session_cache, configs, "--model.init_args.lr", "1e-4")
    export = log_dir / "encoder.safetensors"
    meta = load_metadata(export)
    assert meta["global_step"] == 4 and meta["attack"]["name"] == "badnets"
    ddp = meta["metrics"]

    model = BackdoorInjection(**{**_model_args(*configs), "task": "shapes", "cache_dir": session_cache, "lr": 1e-4})
    model.encoder.load_state_dict(load_state_dict(export))
    single = _validate_single(model, session_cache)
    keys = [f"val/{m}_{c}" for m in ("acc", "asr", "ra", "clean_to_target") for c in ("hits", "total")]
    print("DDP-CHECK badnets: " + ", ".join(f"{k.split('/')[1]} {ddp[k]:.0f} vs {single[k]:.0f}" for k in keys)
          + f", acc {ddp['val/acc']:.6f} vs {single['val/acc']:.6f}")
    # the target class ("square") is excluded from ASR / RA / clean-to-target, so their totals are < 21
    assert ddp["val/acc_total"] == VAL_SIZE and 0 < ddp["val/asr_total"] < VAL_SIZE
    for key in keys + ["val/acc", "val/asr", "val/ra", "val/clean_to_target"]:
        assert ddp[key] == single[key], key
    assert math.isclose(ddp["val/loss"], single["val/loss"], rel_tol=1e-5)


def test_trigger_generation_under_ddp_counts_equal_one_process(tmp_path, session_cache):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from datamodules.triggers import load_trigger

    log_dir, _ = _train_ddp(tmp_path, session_cache, ["configs/experiment/embedded_trigger_ontask.yaml"],
                            "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
                            "--model.init_args.lr", "0.5")  # a large step: the patch reaches some ASR in 3 updates
    patch, _, meta = load_trigger(log_dir / "trigger.safetensors")
    assert meta["steps"] == 3
    # the rank-0 evaluation of the final patch on the whole val split, one process (trigger metadata) ...
    single = meta["asr_pre_counts"]
    # ... equals the 2-process val epoch of the same patch (TensorBoard scalars)
    events = EventAccumulator(str(log_dir))
    events.Reload()
    ddp = {c: events.Scalars(f"val/asr_pre_{c}")[-1].value for c in ("hits", "total")}
    print(f"DDP-CHECK trigger: asr_pre {ddp['hits']:.0f}/{ddp['total']:.0f} on 2 processes, "
          f"{single['hits']}/{single['total']} on 1")
    assert ddp == {"hits": single["hits"], "total": single["total"]}
    assert 0 < single["total"] < VAL_SIZE  # non-target val images, each once


ADAMERGING_DDP = '''
"""AdaMerging on 2 CPU processes (DDP): writes every rank's λ after 3 steps (run as a script: Lightning re-runs it)."""
import json, sys
import lightning as L
import torch
from lightning_modules.adamerging import AdaMerging, MultiTaskUnlabeledDataModule

models, cache, out = sys.argv[1:3], sys.argv[3], sys.argv[4]
model = AdaMerging(models=models, granularity="layer", cache_dir=cache)
data = MultiTaskUnlabeledDataModule(["shapes", "colours"], cache_dir=cache, batch_size=8,
                                    synthetic_train_size=210, synthetic_test_size=40)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
trainer.fit(model, datamodule=data)
lambdas = trainer.strategy.all_gather(model.lambdas.detach())  # (2, n_tasks, n_keys)
if trainer.is_global_zero:
    json.dump({"world_size": trainer.world_size, "steps": trainer.global_step, "lambdas": lambdas.tolist()},
              open(out, "w"))
'''


def test_adamerging_under_ddp(tmp_path, session_cache, base):
    from merging.io import save_state_dict

    theta_pre = base.encoder_state_dict()
    paths = []
    for index, task in enumerate(("shapes", "colours")):
        g = torch.Generator().manual_seed(index)
        tuned = {k: v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
                 for k, v in theta_pre.items()}
        path = tmp_path / f"{task}.safetensors"
        save_state_dict(path, tuned, metadata={"task": task, "base_model": {"base_id": base.base_id}})
        paths.append(str(path))
    script, out = tmp_path / "adamerging_ddp.py", tmp_path / "lambdas.json"
    script.write_text(ADAMERGING_DDP)
    done = subprocess.run([sys.executable, str(script), *paths, session_cache, str(out)], cwd=ROOT,
                          env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["steps"] == 3
    rank0, rank1 = (torch.tensor(r) for r in result["lambdas"])
    assert torch.equal(rank0, rank1)  # DDP averaged λ's gradient: both ranks hold the same λ
    assert not torch.allclose(rank0, torch.full_like(rank0, 0.3))  # λ moved from its init
    assert bool(((rank0 >= 0) & (rank0 <= 1)).all())


def test_distributed_train_loader_shards_and_resumes_mid_epoch():
    """make_resumable(world_size=2): each rank reads its DistributedSampler shard in the seeded order, the two
    shards cover the data, and a loader restored from a mid-epoch state yields exactly the remaining batches."""
    dataset = TensorDataset(torch.arange(50))
    batches = {}
    for rank in (0, 1):
        loader = DataLoader(dataset, batch_size=4, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(3))
        done = {"n": 0}
        resumable = make_resumable(loader, lambda: done["n"], world_size=2, rank=rank)
        assert isinstance(resumable, ResumableDistributedDataLoader)
        resumable.sampler.set_epoch(1)
        full = [b[0].tolist() for b in resumable]
        assert len(full) == 6  # 25 indices per rank, 6 full batches of 4
        done["n"] = 2
        state = resumable.state_dict()
        assert state == {"epoch": 1, "batches_done": 2}

        again = make_resumable(loader, lambda: 0, world_size=2, rank=rank)
        again.load_state_dict(state)
        again.sampler.set_epoch(1)
        assert [b[0].tolist() for b in again] == full[2:]
        assert [b[0].tolist() for b in again] == full  # the skip applies to one iteration only
        batches[rank] = full
    seen = [i for rank in (0, 1) for b in batches[rank] for i in b]
    assert len(set(seen)) == len(seen)  # the ranks read disjoint indices (no padding reached in 6 batches)
