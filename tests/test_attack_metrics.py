"""ASR, RA and clean-to-target rate: hand-computed values, input forms, exact DDP reduction."""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_modules.attack_metrics import AttackSuccessRate, CleanToTargetRate, RobustAccuracy

TARGET = 2
LABELS = torch.tensor([0, 1, 2, 2, 3, 1])
TRIGGERED_PREDS = torch.tensor([2, 2, 2, 0, 2, 1])
CLEAN_PREDS = torch.tensor([0, 2, 2, 2, 3, 1])


def _logits(preds, num_classes=4):
    """Logits whose argmax is ``preds`` (not one-hot, to be sure argmax is taken)."""
    out = torch.randn(len(preds), num_classes, generator=torch.Generator().manual_seed(0))
    out[torch.arange(len(preds)), preds] = 10.0
    return out


def test_hand_computed_example():
    # Counted images: label != 2 -> indices 0, 1, 4, 5 (total 4); indices 2, 3 (label 2) are excluded.
    # ASR: triggered preds at 0, 1, 4, 5 = 2, 2, 2, 1 -> 3 of 4 are the target            = 0.75
    # RA:  triggered preds == labels at 0, 1, 4, 5: 2≠0, 2≠1, 2≠3, 1=1 -> 1 of 4          = 0.25
    # C2T: clean preds at 0, 1, 4, 5 = 0, 2, 3, 1 -> 1 of 4 is the target                 = 0.25
    asr, ra, c2t = AttackSuccessRate(TARGET), RobustAccuracy(TARGET), CleanToTargetRate(TARGET)
    asr.update(TRIGGERED_PREDS, LABELS)
    ra.update(TRIGGERED_PREDS, LABELS)
    c2t.update(CLEAN_PREDS, LABELS)
    assert asr.compute().item() == 0.75 and asr.counts() == {"hits": 3, "total": 4}
    assert ra.compute().item() == 0.25 and ra.counts() == {"hits": 1, "total": 4}
    assert c2t.compute().item() == 0.25 and c2t.counts() == {"hits": 1, "total": 4}
    assert asr.hits.dtype == asr.total.dtype == torch.long


def test_logits_and_class_predictions_agree_and_accumulate():
    by_class, by_logits = AttackSuccessRate(TARGET), AttackSuccessRate(TARGET)
    by_class.update(TRIGGERED_PREDS, LABELS)
    by_logits.update(_logits(TRIGGERED_PREDS), LABELS)
    assert by_class.counts() == by_logits.counts()
    by_logits.update(_logits(TRIGGERED_PREDS[:2]), LABELS[:2])  # two more counted images, both hits
    assert by_logits.counts() == {"hits": 5, "total": 6}


def test_target_class_images_are_excluded():
    asr, ra = AttackSuccessRate(1), RobustAccuracy(1)
    labels = torch.tensor([1, 1, 1])
    asr.update(torch.tensor([1, 1, 0]), labels)
    ra.update(torch.tensor([1, 1, 0]), labels)
    assert asr.counts() == {"hits": 0, "total": 0} and asr.compute().item() == 0.0  # empty: 0, not NaN
    assert ra.counts() == {"hits": 0, "total": 0}
    every = RobustAccuracy(-1)  # target -1 counts every image
    every.update(torch.tensor([1, 1, 0]), labels)
    assert every.counts() == {"hits": 2, "total": 3}


def test_bad_inputs():
    with pytest.raises(ValueError, match="integer classes"):
        AttackSuccessRate(0).update(torch.tensor([0.0, 1.0]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="logits"):
        AttackSuccessRate(0).update(torch.zeros(3, 4), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="target"):
        AttackSuccessRate(-2)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Uneven shards (rank 0: 5 images, rank 1: 3), so a mean of per-rank rates would differ from the exact rate.
_SHARD = {0: slice(0, 5), 1: slice(5, 8)}
_ALL_LABELS = torch.tensor([0, 1, 2, 3, 1, 0, 3, 2])
_ALL_TRIGGERED = torch.tensor([2, 2, 2, 3, 2, 0, 1, 2])
_ALL_CLEAN = torch.tensor([0, 2, 2, 3, 1, 0, 3, 2])


def _update_all(metrics, sl):
    asr, ra, c2t = metrics
    asr.update(_logits(_ALL_TRIGGERED[sl]), _ALL_LABELS[sl])
    ra.update(_ALL_TRIGGERED[sl], _ALL_LABELS[sl])
    c2t.update(_ALL_CLEAN[sl], _ALL_LABELS[sl])


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        metrics = (AttackSuccessRate(TARGET), RobustAccuracy(TARGET), CleanToTargetRate(TARGET))
        _update_all(metrics, _SHARD[rank])
        result = {type(m).__name__: {"rate": m.compute().item(), "counts": m.counts(), "local_total": int(m.total)}
                  for m in metrics}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_reduce_exactly(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = (AttackSuccessRate(TARGET), RobustAccuracy(TARGET), CleanToTargetRate(TARGET))
    _update_all(single, slice(None))
    expected = {type(m).__name__: {"rate": m.compute().item(), "counts": m.counts()} for m in single}
    # By hand: label != 2 at idx 0, 1, 3, 4, 5, 6 (total 6). ASR: triggered pred 2 at idx 0, 1, 4 -> 3/6;
    # RA: pred == label at idx 3, 5 -> 2/6; C2T: clean pred 2 at idx 1 -> 1/6. Per-rank ASRs are 3/4 and
    # 0/2, whose mean (0.375) is not the exact 0.5: only summed counts reduce exactly.
    assert expected["AttackSuccessRate"]["counts"] == {"hits": 3, "total": 6}
    assert expected["RobustAccuracy"]["counts"] == {"hits": 2, "total": 6}
    assert expected["CleanToTargetRate"]["counts"] == {"hits": 1, "total": 6}
    assert expected["AttackSuccessRate"]["rate"] == 0.5
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name, want in expected.items():
            assert got[name]["counts"] == want["counts"], (rank, name)
            assert got[name]["rate"] == pytest.approx(want["rate"], abs=1e-7), (rank, name)
        # counts() restored the local state after syncing: each rank still holds only its shard.
        assert got["AttackSuccessRate"]["local_total"] == (4 if rank == 0 else 2)
