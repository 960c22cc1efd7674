"""Backdoor evaluation after merging: one pass per batch, rates against a hand count, triggers from metadata."""

import pytest
import torch
import torch.nn.functional as F

from datamodules.triggers import TriggerError, TriggerSpec, init_patch, init_pattern, trigger_from_attack
from evaluation.evaluate import AttackProbe, EvalTask, evaluate

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class PixelEncoder(torch.nn.Module):
    """f(x) = mean over the bottom-right 4×4 corner and over the whole image, per channel → (B, 6)."""

    def forward(self, x):
        return torch.cat([x[:, :, -4:, -4:].mean((2, 3)), x.mean((2, 3))], dim=1)


def _task(seed=0, n=40, classes=3):
    g = torch.Generator().manual_seed(seed)
    head = F.normalize(torch.randn(classes, 6, generator=g), dim=-1)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return EvalTask("toy", head, [(x[:25], y[:25]), (x[25:], y[25:])])


def test_attack_rates_match_a_hand_count():
    task = _task()
    spec = TriggerSpec(kind="patch", size=4, location="bottom_right", seed=3)
    patch = torch.full((3, 4, 4), 3.0)  # a strong corner: moves the first three features
    probe = AttackProbe("corner", patch, spec, "toy", 1, {"name": "badnets"})
    accs, attacks = evaluate(PixelEncoder(), {"toy": task}, [probe])
    # Hand reference: paste the patch, classify by the head, count over labels ≠ target.
    x = torch.cat([b[0] for b in task.batches])
    y = torch.cat([b[1] for b in task.batches])
    x_bd = x.clone()
    x_bd[:, :, 4:, 4:] = patch
    pred = (F.normalize(PixelEncoder()(x), dim=-1) @ task.head.T).argmax(1)
    pred_bd = (F.normalize(PixelEncoder()(x_bd), dim=-1) @ task.head.T).argmax(1)
    keep = y != 1
    assert accs["toy"] == pytest.approx((pred == y).float().mean().item())
    got = attacks["corner"]
    assert got["asr_total"] == got["ra_total"] == got["clean_to_target_total"] == int(keep.sum())
    assert got["asr_hits"] == int((pred_bd[keep] == 1).sum())
    assert got["ra_hits"] == int((pred_bd[keep] == y[keep]).sum())
    assert got["clean_to_target_hits"] == int((pred[keep] == 1).sum())
    assert got["asr"] == pytest.approx(got["asr_hits"] / got["asr_total"])
    # Without probes the same accuracy, and a probe aimed at another task measures nothing here.
    other = AttackProbe("elsewhere", patch, spec, "other", 0, {})
    accs2, attacks2 = evaluate(PixelEncoder(), {"toy": task}, [other])
    assert accs2 == accs and attacks2 == {}


def test_trigger_from_attack_metadata():
    spec = TriggerSpec(kind="patch", size=4, seed=7)
    stored = init_patch(spec, MEAN, STD) * 0.5
    meta = {"trigger": spec.to_dict(), "trigger_values": stored.tolist(), "mean": list(MEAN), "std": list(STD)}
    tensor, got = trigger_from_attack(meta, 24)
    assert got == spec and torch.equal(tensor, stored)  # exact float32 round trip through JSON lists
    # Random triggers are regenerated from their seed.
    tensor, _ = trigger_from_attack({**meta, "trigger_values": None}, 24)
    assert torch.equal(tensor, init_patch(spec, MEAN, STD))
    blend = TriggerSpec(kind="blend", alpha=0.1, seed=2)
    tensor, _ = trigger_from_attack({"trigger": blend.to_dict(), "mean": list(MEAN), "std": list(STD)}, 24)
    assert torch.equal(tensor, init_pattern(blend, MEAN, STD, 24))
    with pytest.raises(TriggerError, match="lacks"):
        trigger_from_attack({"trigger": spec.to_dict()}, 24)
    with pytest.raises(TriggerError, match="exceeds the image size"):
        trigger_from_attack(meta, 3)
