"""BadMerging stage 1: the universal trigger against the frozen θ_pre, PGD augmentation, export, CLI."""

from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules.datamodule import TaskDataModule
from datamodules.synthetic import COLOURS, SHAPES
from datamodules.tasks import get_task
from datamodules.triggers import load_trigger, normalised_bounds, paste_patch
from lightning_modules.attack_metrics import AttackSuccessRate
from lightning_modules.injection import BackdoorInjection
from lightning_modules.trigger_generation import (
    UniversalTrigger,
    compositional_shadow_classnames,
    default_shadow_classnames,
    targeted_pgd,
)

SQUARE = SHAPES.index("square")
PURPLE = COLOURS.index("purple")


def _data(tmp_path, task="shapes", batch_size=32):
    data = TaskDataModule(task=task, synthetic_train_size=128, synthetic_test_size=32, batch_size=batch_size,
                          eval_batch_size=64, cache_dir=str(tmp_path))
    data.prepare_data()
    data.setup("fit")
    return data


def _trainer(tmp_path, max_steps, **kwargs):
    return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     default_root_dir=str(tmp_path), **kwargs)


def _held_out(data):
    """Test images of non-target classes (x (N, 3, S, S), y (N,))."""
    xs, ys = zip(*(data.splits["test"][i] for i in range(len(data.splits["test"]))))
    x, y = torch.stack(xs), torch.tensor(ys)
    return x[y != SQUARE], y[y != SQUARE]


def _target_prob(model, x):
    with torch.no_grad():
        return torch.softmax(model.logits(model.add_trigger(x)), -1)[:, SQUARE].mean().item()


def test_on_task_run_raises_target_probability_and_keeps_theta_pre(tmp_path, base):
    data = _data(tmp_path)
    model = UniversalTrigger(task="shapes", target_class=SQUARE, lr=0.05, cache_dir=str(tmp_path),
                             output_path=str(tmp_path / "ut" / "trigger.safetensors"))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["patch"]
    x_test, y_test = _held_out(data)
    before = _target_prob(model, x_test)
    theta_pre = base.encoder_state_dict()
    trainer = _trainer(tmp_path, max_steps=20, val_check_interval=10, check_val_every_n_epoch=None,
                       limit_val_batches=1)
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 20  # one patch update per batch
    after = _target_prob(model, x_test)
    assert after > 1.2 * before, (before, after)
    # θ_pre: frozen, in eval mode, bit-identical.
    assert all(not p.requires_grad and p.grad is None for p in model.encoder.parameters())
    assert not model.encoder.training
    assert all(torch.equal(v, theta_pre[k]) for k, v in model.encoder.state_dict().items())
    # P stays a valid image: within the per-channel normalised bounds of pixels 0 and 1.
    lo, hi = normalised_bounds(model.mean, model.std)
    patch = model.patch.detach()
    assert torch.all(patch >= lo[:, None, None] - 1e-6) and torch.all(patch <= hi[:, None, None] + 1e-6)
    assert {"train/loss", "train/asr", "val/asr_pre", "val/clean_to_target_pre"} <= trainer.callback_metrics.keys()

    # The file: same tensor, metadata with what made it; ASR on θ_pre matches a direct count.
    tensor, spec, meta = load_trigger(model.trigger_path)
    assert torch.equal(tensor, patch) and spec == model.spec_trigger and spec.size == 4
    assert meta["mode"] == "on_task" and meta["target_class"] == SQUARE and meta["target_name"] == "square"
    assert meta["steps"] == 20 and meta["base_model"]["base_id"] == base.base_id and meta["stage"] == 1
    metric = AttackSuccessRate(SQUARE)
    with torch.no_grad():
        for x, y in data.val_dataloader():
            metric.update(model.logits(paste_patch(x, tensor, spec)), y)
    assert meta["asr_pre"] == pytest.approx(float(metric.compute()))
    assert meta["asr_pre_counts"] == metric.counts()
    assert Path(model.trigger_path).with_suffix(".png").is_file()

    # Stage 2 accepts it.
    injection = BackdoorInjection(task="shapes", attack="ut_only", trigger_path=str(model.trigger_path),
                                  target_class=SQUARE, cache_dir=str(tmp_path))
    assert torch.equal(injection.trigger_tensor, tensor) and injection.trigger_spec == spec


def test_per_image_plain_procedure_carries_patch(tmp_path):
    data = _data(tmp_path, batch_size=4)
    model = UniversalTrigger(task="shapes", target_class=SQUARE, procedure="per_image", optimizer="plain", lr=1.0,
                             inner_steps=3, cache_dir=str(tmp_path), output_path=str(tmp_path / "t.safetensors"))
    start = model.patch.detach().clone()
    trainer = _trainer(tmp_path, max_steps=-1, max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(model, datamodule=data)
    # global_step counts updates: at most inner_steps per attacked image of the one batch.
    assert 0 < trainer.global_step <= 3 * 4
    assert not torch.equal(model.patch.detach(), start)
    assert "train/updates" in trainer.callback_metrics


def test_targeted_pgd_succeeds_within_eps_ball(tmp_path):
    data = _data(tmp_path)
    model = UniversalTrigger(task="shapes", target_class=SQUARE, cache_dir=str(tmp_path))
    x, y = next(iter(data.val_dataloader()))
    x = x[:12]
    with torch.no_grad():
        pred = model.logits(x).argmax(-1)
    targets = (pred + 1 + torch.arange(len(x)) % 9) % 10  # some class other than the prediction
    eps = 8 / 255
    adv, success = targeted_pgd(model.logits, x, targets, model.mean, model.std, eps=eps, step=1 / 255, steps=10)
    assert success.any()
    mean = torch.tensor(model.mean)[None, :, None, None]
    std = torch.tensor(model.std)[None, :, None, None]
    p0, p = (x * std + mean).clamp(0, 1), adv * std + mean
    assert (p - p0).abs().max() <= eps + 1e-5
    assert p.min() >= -1e-5 and p.max() <= 1 + 1e-5
    with torch.no_grad():
        adv_pred = model.logits(adv).argmax(-1)
    assert torch.equal(adv_pred[success], targets[success])  # the kept iterate is a success


def test_default_shadow_classnames(base):
    names = default_shadow_classnames("purple", "colours", 50, base.tokenizer)
    assert names[0] == "purple" and len(set(names)) == len(names)
    # The victim task's other names are unknown to the attacker; only a generic list may hold some ("orange").
    assert set(names[1:]) & set(COLOURS) <= set(get_task("cifar100").classnames)
    assert {"square", "7", "checkerboard"} <= set(names)
    prompts = [tuple(base.tokenizer([f"a photo of a {n}."])[0].tolist()) for n in names]
    assert len(set(prompts)) == len(prompts)  # no two rows of the shadow head are the same text
    assert len(default_shadow_classnames("Acura RL Sedan 2012", "stanford_cars", 50)) == 51


def test_compositional_shadow_classnames(base):
    names = compositional_shadow_classnames("purple", "colours", 150, base.tokenizer)
    assert names[0] == "purple" and len(set(names)) == len(names)
    # 10 colours × 10 shapes less the 10 with the target's word, then the class-name list's others (deduplicated).
    comps = [n for n in names if " " in n and n.split()[0] in COLOURS and n.split(" ", 1)[1] in SHAPES]
    assert len(comps) == 100 - 10 and names[1:91] == comps
    assert not any("purple" in n for n in names[1:])
    assert names[91:] == [n for n in default_shadow_classnames("purple", "colours", 150, base.tokenizer)[1:]
                          if n not in comps]
    # every composition is a text the embedded tower knows (its shapes captions: "a photo of a red circle.")
    assert not any(base.tokenizer.unknown_words(f"a photo of a {n}.") for n in comps)
    assert len(compositional_shadow_classnames("purple", "colours", 10, base.tokenizer)) == 11
    # a multi-word target drops the compositions holding any of its words
    assert not any("star" in n for n in compositional_shadow_classnames("red star", "shapes", 150)[1:])


def test_off_task_compositional_vocabulary_builds_its_head(tmp_path, base):
    model = UniversalTrigger(task="colours", mode="off_task", target_class=PURPLE, shadow_vocabulary="compositional",
                             num_shadow_classes=20, shadow_templates="shapes", cache_dir=str(tmp_path))
    assert model.shadow_classnames == compositional_shadow_classnames("purple", "colours", 20, base.tokenizer)
    assert model.attack_head.shape[0] == 21 and model.shadow_classnames[1] == "red circle"
    with pytest.raises(ValueError, match="shadow_vocabulary=.words. is unknown; use one of names, compositional, imagenet"):
        UniversalTrigger(task="colours", mode="off_task", target_class=PURPLE, shadow_vocabulary="words",
                         cache_dir=str(tmp_path))


def test_off_task_run_builds_pgd_set_and_exports(tmp_path):
    data = _data(tmp_path, task="colours", batch_size=8)
    model = UniversalTrigger(task="colours", mode="off_task", target_class=PURPLE, reference_images=2,
                             augment_to=8, pgd={"steps": 5, "min_keep": 6}, cache_dir=str(tmp_path),
                             output_path=str(tmp_path / "off" / "trigger.safetensors"))
    assert model.shadow_classnames[0] == "purple" and model.target == 0
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=1, val_check_interval=2, check_val_every_n_epoch=None)
    trainer.fit(model, datamodule=data)
    info = model.set_info
    assert len(info["reference_indices"]) == 2 and info["augmented"] == 8
    assert info["set_size"] == max(info["pgd_success"], 6) == len(model._set_x)
    assert {"val/asr_pre", "val/asr_pre_task"} <= trainer.callback_metrics.keys()
    tensor, spec, meta = load_trigger(model.trigger_path)
    assert meta["mode"] == "off_task" and meta["target_name"] == "purple" and meta["shadow_target"] == 0
    assert meta["shadow_classnames"] == model.shadow_classnames and meta["offtask_set"]["pgd_success"] >= 0
    # Off-task the val images of the target class are excluded; all others count.
    val_labels = torch.cat([y for _, y in data.val_dataloader()])
    assert meta["asr_pre_counts"]["total"] == int((val_labels != PURPLE).sum())
    injection = BackdoorInjection(task="shapes", attack="ut_only", trigger_path=str(model.trigger_path),
                                  off_task_classnames=meta["shadow_classnames"], cache_dir=str(tmp_path))
    assert injection.target == 0 and injection.target_name == "purple"


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="mode='x' is unknown"):
        UniversalTrigger(mode="x", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown model.pgd key"):
        UniversalTrigger(pgd={"epsilon": 0.1}, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="is not a class of task shapes"):
        UniversalTrigger(target_class=10, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="put the target's name first"):
        UniversalTrigger(task="colours", mode="off_task", target_class=PURPLE, off_task_classnames=["red", "dog"],
                         cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="set model.trigger.kind=patch"):
        UniversalTrigger(trigger={"kind": "blend"}, cache_dir=str(tmp_path))


def test_cli_writes_trigger(tmp_path):
    import train

    root = Path(__file__).resolve().parent.parent
    train.main([
        "fit", "--config", str(root / "configs/experiment/embedded_trigger_ontask.yaml"),
        "--data.synthetic_train_size", "128", "--data.synthetic_test_size", "32", "--data.batch_size", "32",
        "--data.eval_batch_size", "64", "--model.init_args.cache_dir", str(tmp_path / "cache"),
        "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.default_root_dir", str(tmp_path),
    ])
    files = list(tmp_path.rglob("trigger.safetensors"))
    assert len(files) == 1 and files[0].with_suffix(".png").is_file()
    tensor, spec, meta = load_trigger(files[0])
    assert spec.size == 6 and spec.location == "bottom_right" and meta["target_name"] == "square"  # the config's trigger
    assert meta["steps"] == 2 and meta["recipe"]["optimizer"] == "adam"
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events  # trigger/patch and trigger/samples go to TensorBoard


def test_checkpoint_leaves_out_theta_pre_and_restores(tmp_path):
    model = UniversalTrigger(task="shapes", target_class=SQUARE, cache_dir=str(tmp_path))
    with torch.no_grad():
        model.patch.add_(0.1)
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == {"patch"}  # θ_pre is rebuilt from the base model, not stored
    again = UniversalTrigger(task="shapes", target_class=SQUARE, cache_dir=str(tmp_path))
    again.on_load_checkpoint(checkpoint)
    again.load_state_dict(checkpoint["state_dict"])  # strict: the frozen weights were put back
    assert torch.equal(again.patch, model.patch)
