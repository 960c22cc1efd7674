"""AdaMerging on the embedded model with two tiny synthetic "fine-tuned" encoders."""

import lightning as L
import pytest
import torch

from lightning_modules.adamerging import AdaMerging, MultiTaskUnlabeledDataModule, prediction_entropy
from merging.io import load_state_dict, save_state_dict
from merging.methods import task_arithmetic
from merging.task_vectors import task_vector

TASKS = ("shapes", "colours")
DATA = dict(synthetic_train_size=200, synthetic_test_size=40)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, base):
    tmp = tmp_path_factory.mktemp("adamerging")
    cache = str(tmp / "cache")
    theta_pre = base.encoder_state_dict()
    paths = []
    for index, task in enumerate(TASKS):
        g = torch.Generator().manual_seed(index)
        tuned = {k: v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
                 for k, v in theta_pre.items()}
        path = tmp / f"{task}.safetensors"
        save_state_dict(path, tuned, metadata={"task": task, "base_model": {"base_id": base.base_id}})
        paths.append(str(path))
    data = MultiTaskUnlabeledDataModule(list(TASKS), cache_dir=cache, batch_size=8, **DATA)
    data.prepare_data()
    data.setup("fit")
    return paths, cache, data, theta_pre


def _vectors(paths, theta_pre):
    return [task_vector(load_state_dict(p), theta_pre) for p in paths]


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_init_equals_task_arithmetic(setup, granularity):
    paths, cache, _, theta_pre = setup
    model = AdaMerging(models=paths, granularity=granularity, cache_dir=cache)
    assert model.task_names == list(TASKS)  # read from the metadata
    n_keys = len(model.merge_keys)
    assert model.lambdas.shape == ((2,) if granularity == "task" else (2, n_keys))
    expected = task_arithmetic(theta_pre, _vectors(paths, theta_pre), coefficient=0.3)
    merged = model.merged_state_dict()
    assert merged.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], atol=1e-6, rtol=0)
    assert len(model.coefficients()) == 2


def test_only_lambda_trains_and_receives_gradients(setup):
    paths, cache, data, _ = setup
    model = AdaMerging(models=paths, granularity="layer", cache_dir=cache)
    assert [n for n, p in model.named_parameters()] == ["lambdas"]
    assert all(not t.requires_grad for t in model._tau.values())
    assert all(not p.requires_grad for p in model.encoder.parameters())
    batch = next(iter(data.train_dataloader()))[0]
    loss = sum(prediction_entropy(v) for v in model(model._images(batch)).values())
    loss.backward()
    assert model.lambdas.grad is not None and model.lambdas.grad.abs().sum() > 0
    assert model.lambdas.grad.shape == model.lambdas.shape


def test_entropy_descent_on_a_fixed_batch(setup):
    paths, cache, data, _ = setup
    model = AdaMerging(models=paths, granularity="task", cache_dir=cache)
    images = model._images(next(iter(data.train_dataloader()))[0])
    optimiser = torch.optim.Adam([model.lambdas], lr=1e-2)

    def entropy():
        return sum(prediction_entropy(v) for v in model(images).values())

    before = entropy().item()
    for _ in range(3):
        optimiser.zero_grad()
        entropy().backward()
        optimiser.step()
    assert entropy().item() < before


@pytest.mark.parametrize("granularity,init", [("task", 0.3), ("layer", 1.0)])
def test_trainer_steps_change_and_clamp_lambda(setup, granularity, init):
    paths, cache, data, _ = setup
    model = AdaMerging(models=paths, granularity=granularity, init=init, cache_dir=cache)
    start = model.lambdas.detach().clone()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 3
    lam = model.lambdas.detach()
    assert not torch.equal(lam, start)
    assert lam.min() >= 0 and lam.max() <= 1  # at init 1.0 about half the steps push above 1
    assert {"adamerging/entropy", "adamerging/lambda_mean"} <= set(trainer.callback_metrics)
    # the learned coefficients reproduce the merged weights
    theta_pre = model._pretrained
    key = model.merge_keys[0]
    column = lam if lam.dim() == 1 else lam[:, 0]
    expected = theta_pre[key] + sum(c * model._tau[key][t] for t, c in enumerate(column))
    torch.testing.assert_close(model.merged_state_dict()[key], expected, atol=1e-6, rtol=0)


def test_errors_name_the_input(setup):
    paths, cache, _, _ = setup
    with pytest.raises(ValueError, match="no fine-tuned models"):
        AdaMerging(models=[], cache_dir=cache)
    with pytest.raises(ValueError, match="1 tasks for 2 models"):
        AdaMerging(models=paths, tasks=["shapes"], cache_dir=cache)

