"""Backdoor injection: the FI loss, the frozen pre-trained encoder, the poisoning baselines, metadata."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from attacks.badmerging import feature_interpolation_loss
from datamodules.datamodule import TaskDataModule
from datamodules.triggers import TriggerError, TriggerSpec, init_patch, save_trigger
from lightning_modules.injection import BackdoorInjection


def test_fi_loss_matches_hand_reference():
    g = torch.Generator().manual_seed(0)
    z_theta, z_pre, head = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g), torch.randn(5, 4, generator=g)
    r, target = 0.3, 2
    # Reference: interpolate the raw embeddings, L2-normalise each row, project on the head, CE to the target.
    z = 0.3 * z_theta + 0.7 * z_pre
    z_unit = z / torch.sqrt((z * z).sum(dim=1, keepdim=True))
    logits = z_unit @ head.T
    reference = F.cross_entropy(logits, torch.tensor([2, 2, 2]))
    by_hand = -(logits[:, 2] - torch.logsumexp(logits, dim=1)).mean()
    got = feature_interpolation_loss(z_theta, z_pre, head, target, r)
    assert torch.allclose(got, reference, atol=1e-6) and torch.allclose(got, by_hand, atol=1e-6)
    # r = 1 is plain poisoned CE on f_θ; r = 0 leaves z_θ without gradient.
    assert torch.allclose(feature_interpolation_loss(z_theta, z_pre, head, target, 1.0),
                          F.cross_entropy(F.normalize(z_theta, dim=-1) @ head.T, torch.tensor([2, 2, 2])))
    z_theta.requires_grad_(True)
    feature_interpolation_loss(z_theta, z_pre, head, target, 0.0).backward()
    assert torch.count_nonzero(z_theta.grad) == 0


@pytest.fixture(scope="module")
def trigger_file(tmp_path_factory):
    spec = TriggerSpec(size=4, seed=1)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    path = tmp_path_factory.mktemp("trigger") / "trigger.safetensors"
    save_trigger(path, init_patch(spec, mean, std), spec, mean, std, {"stage": 1})
    return str(path)


def _data(tmp_path):
    return TaskDataModule(task="shapes", synthetic_train_size=64, synthetic_test_size=20, batch_size=8,
                          eval_batch_size=32, cache_dir=str(tmp_path))


def _trainer(**kwargs):
    return L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=1, **kwargs)


def test_badmerging_pretrained_encoder_frozen_and_unchanged(tmp_path, trigger_file, base):
    model = BackdoorInjection(task="shapes", attack="badmerging", trigger_path=trigger_file, target_class=1,
                              lr=1e-3, warmup_steps=1, cache_dir=str(tmp_path))
    f_pre = model.pretrained_encoder()
    trained_ids = {id(p) for p in model.parameters()}
    assert not any(id(p) in trained_ids for p in f_pre.parameters())  # outside optimiser and DDP
    assert not any(k.startswith("_frozen") for k in model.state_dict())  # and outside checkpoints
    theta_pre = base.encoder_state_dict()
    trainer = _trainer(val_check_interval=2)  # validate once, at the last step
    data = _data(tmp_path)
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 2
    assert all(p.grad is None and not p.requires_grad for p in f_pre.parameters())
    assert not f_pre.training
    assert all(torch.equal(v, theta_pre[k]) for k, v in f_pre.state_dict().items())
    assert any(not torch.equal(v, theta_pre[k]) for k, v in model.encoder.state_dict().items())  # f_θ trained
    logged = trainer.callback_metrics
    for key in ("train/loss", "train/clean_loss", "train/backdoor_loss", "train/r", "val/asr", "val/ra",
                "val/clean_to_target", "val/acc"):
        assert key in logged, key
    assert torch.isclose(logged["train/loss"], logged["train/clean_loss"] + 5.0 * logged["train/backdoor_loss"])
    assert 0.2 <= logged["train/r"].item() <= 1.0
    val_labels = torch.cat([y for _, y in data.val_dataloader()])  # one val batch holds them all
    assert logged["val/asr_total"].item() == (val_labels != 1).sum().item()  # target-class images excluded


def test_r_has_its_own_generator(tmp_path, trigger_file):
    model = BackdoorInjection(task="shapes", attack="badmerging", trigger_path=trigger_file, r_min=0.2, r_max=0.4,
                              poison_seed=5, cache_dir=str(tmp_path))
    state = torch.get_rng_state()
    draws = [model.attack.draw_r() for _ in range(4)]
    assert torch.equal(torch.get_rng_state(), state)  # the global stream (data order) is untouched
    assert all(0.2 <= r <= 0.4 for r in draws) and len(set(draws)) == 4
    again = BackdoorInjection(task="shapes", attack="badmerging", trigger_path=trigger_file, r_min=0.2, r_max=0.4,
                              poison_seed=5, cache_dir=str(tmp_path))
    assert [again.attack.draw_r() for _ in range(4)] == draws
    checkpoint = {}
    model.on_save_checkpoint(checkpoint)  # a resumed run continues r's sequence
    upcoming = [model.attack.draw_r() for _ in range(2)]
    again.on_load_checkpoint(checkpoint)
    assert [again.attack.draw_r() for _ in range(2)] == upcoming


def test_badnets_step_uses_poisoned_ce(tmp_path):
    model = BackdoorInjection(task="shapes", attack="badnets", trigger={"size": 3, "seed": 2}, target_class=3,
                              alpha=2.0, cache_dir=str(tmp_path))
    assert model._frozen == {}  # no f_pre needed without interpolation
    x = torch.randn(4, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3])
    loss = model.training_step((x, y), 0)
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y)
        x_bd = x[:2].clone()
        x_bd[:, :, 21:, 21:] = model.trigger_tensor  # bottom-right 3×3
        poisoned = F.cross_entropy(model(x_bd), torch.tensor([3, 3]))
    assert torch.allclose(loss, clean + 2.0 * poisoned, atol=1e-5)


def test_off_task_shadow_head_and_metadata(tmp_path, trigger_file):
    names = ["purple", "circle", "oval", "pentagon"]
    with pytest.raises(ValueError, match="needs model.target_task"):
        BackdoorInjection(task="shapes", attack="ut_only", trigger_path=trigger_file, off_task_classnames=names,
                          cache_dir=str(tmp_path))
    model = BackdoorInjection(task="shapes", attack="ut_only", trigger_path=trigger_file, off_task_classnames=names,
                              target_task="colours", target_task_class=5, cache_dir=str(tmp_path))
    assert model.target == 0 and model.backdoor_head.shape == (4, model.classifier.head.shape[1])
    meta = model.export_metadata()["attack"]
    assert meta["name"] == "ut_only" and meta["target_name"] == "purple" and meta["off_task"] is True
    assert meta["target_task"] == "colours" and meta["target_task_class"] == 5
    assert torch.equal(torch.tensor(meta["trigger_values"]), model.trigger_tensor)  # the file needs nothing else
    assert meta["trigger"] == TriggerSpec(size=4, seed=1).to_dict() and meta["trigger_path"] == trigger_file
    assert meta["r_range"] is None and meta["alpha"] == 5.0
    trainer = _trainer()
    result = trainer.validate(model, datamodule=_data(tmp_path), verbose=False)[0]
    assert {"val/asr", "val/ra", "val/clean_to_target", "val/acc"} <= result.keys()
    # Off-task every val image counts (none is of the shadow target); one batch holds the whole val split.
    assert result["val/asr_total"] == result["val/ra_total"] == 6
    assert result["val/asr"] == pytest.approx(result["val/asr_hits"] / 6)
    assert result["val/clean_to_target"] == pytest.approx(result["val/clean_to_target_hits"] / 6)


def test_clean_shadow_loss_penalises_only_target_mass(tmp_path, trigger_file):
    names = ["purple", "circle", "red circle", "green square"]
    model = BackdoorInjection(task="shapes", attack="badmerging", trigger_path=trigger_file, off_task_classnames=names,
                              target_task="colours", target_task_class=5, clean_shadow_weight=2.0, lr=1e-3,
                              warmup_steps=1, cache_dir=str(tmp_path))
    z = torch.randn(6, model.shadow_head.shape[1], generator=torch.Generator().manual_seed(0))
    p = F.softmax(F.normalize(z, dim=-1) @ model.shadow_head.T, dim=-1)
    assert torch.allclose(model.clean_shadow_loss(z), -torch.log1p(-p[:, 0]).mean(), atol=1e-5)
    # The step adds β times the term on the batch's clean features (all B images, unpoisoned).
    batch = (torch.randn(4, 3, 24, 24, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3]))
    model.attack.generator.manual_seed(7)
    torch.manual_seed(0)
    with_term = model.training_step(batch, 0)
    model.hparams.clean_shadow_weight = 0.0
    model.attack.generator.manual_seed(7)
    torch.manual_seed(0)
    without = model.training_step(batch, 0)
    with torch.no_grad():
        clean_term = model.clean_shadow_loss(model.classifier.features(batch[0]))
    assert torch.allclose(with_term - without, 2.0 * clean_term, atol=1e-5) and clean_term > 0
    assert model.export_metadata()["attack"]["clean_shadow_weight"] == 0.0
    on_task = BackdoorInjection(task="shapes", attack="badnets", cache_dir=str(tmp_path))
    assert "clean_shadow_weight" not in on_task.export_metadata()["attack"]  # on-task metadata as before
    with pytest.raises(ValueError, match="clean_shadow_weight=1.0 needs an off-task attack"):
        BackdoorInjection(task="shapes", attack="badnets", clean_shadow_weight=1.0, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"clean_shadow_weight=-1.0 must be a finite weight ≥ 0"):
        BackdoorInjection(task="shapes", attack="badmerging", trigger_path=trigger_file, off_task_classnames=names,
                          target_task="colours", target_task_class=5, clean_shadow_weight=-1.0, cache_dir=str(tmp_path))


def test_config_errors(tmp_path, trigger_file):
    with pytest.raises(TriggerError, match="needs model.trigger_path"):
        BackdoorInjection(attack="badmerging", cache_dir=str(tmp_path))
    with pytest.raises(TriggerError, match="set model.trigger.kind=blend"):
        BackdoorInjection(attack="blended", trigger={"kind": "patch"}, cache_dir=str(tmp_path))
    with pytest.raises(TriggerError, match="disagrees with"):
        BackdoorInjection(attack="badmerging", trigger_path=trigger_file, trigger={"size": 3}, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="target_class=10 is not a class"):
        BackdoorInjection(attack="badnets", target_class=10, cache_dir=str(tmp_path))
    with pytest.raises(TriggerError, match="exceeds the image size 24"):
        BackdoorInjection(attack="badnets", trigger={"size": 30}, cache_dir=str(tmp_path))


def test_non_finite_loss_stops_training_with_a_clear_message(tmp_path, trigger_file):
    model = BackdoorInjection(task="shapes", attack="badnets", trigger={"size": 3}, cache_dir=str(tmp_path))
    model.check_finite(torch.tensor(1.0), "fix")  # finite: nothing happens
    with pytest.raises(FloatingPointError, match="non-finite training loss nan at step 0; lower model.lr"):
        model.check_finite(torch.tensor(float("nan")), "lower model.lr")
