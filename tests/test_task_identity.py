"""Task identity, checked wherever a task is read: a model's sidecar against its safetensors header, two models
on one task, ``--tasks`` against the metadata; run folders named by task, ``--ckpt_path last`` staying in this
task's runs, and an explicit ``--ckpt_path`` (fit, validate, test) of another task refused."""

import json
import os
from pathlib import Path

import pytest
import torch

import merge
import train
from evaluation.inputs import model_metadata, model_tasks, task_of
from experiments.training import _find_last_checkpoint, _name_runs_by_task, checkpoint_task
from merging.io import MergeInputError, save_state_dict

CONFIG = "configs/experiment/embedded_finetune.yaml"
TINY = ["--trainer.enable_progress_bar", "false", "--data.synthetic_train_size", "64", "--data.synthetic_test_size", "16",
        "--data.batch_size", "16", "--trainer.max_steps", "2"]


def _export(path: Path, task: str, base, offset: float) -> str:
    theta = {k: v + offset if v.is_floating_point() else v for k, v in base.encoder_state_dict().items()}
    save_state_dict(path, theta, {"kind": "finetune", "task": task, "base_model": base.describe()})
    return str(path)


# -- merge inputs ------------------------------------------------------------------------------------
def test_sidecar_and_header_naming_different_tasks_are_refused(tmp_path, base, session_cache, one_error_line):
    edited = _export(tmp_path / "edited.safetensors", "shapes", base, 1e-3)
    sidecar = tmp_path / "edited.json"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "task": "digits"}))
    expected = (f"{edited}: its sidecar {sidecar} names task digits but its header names shapes; one was edited, "
                "re-export the model")
    with pytest.raises(MergeInputError) as error:
        model_metadata(edited)
    assert str(error.value) == expected
    other = _export(tmp_path / "colours.safetensors", "colours", base, 2e-3)
    out = tmp_path / "out"
    assert merge.main(["--models", edited, other, "--coefficients", "0.3", "--out_dir", str(out),
                       "--cache_dir", session_cache]) == 2
    assert one_error_line("merge.py") == f"merge.py: error: {expected}"
    assert not out.exists()
    # the two copies agreeing is accepted
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "task": "shapes"}))
    assert model_metadata(edited)["task"] == "shapes"


def test_tasks_flag_contradicting_the_metadata_is_refused(tmp_path, base, session_cache, one_error_line):
    shapes = _export(tmp_path / "shapes.safetensors", "shapes", base, 1e-3)
    colours = _export(tmp_path / "colours.safetensors", "colours", base, 2e-3)
    expected = (f"{colours} was fine-tuned on task colours, but --tasks gives shapes; drop --tasks or give colours "
                "in its place")
    out = tmp_path / "out"
    assert merge.main(["--models", shapes, colours, "--tasks", "shapes", "shapes", "--coefficients", "0.3",
                       "--out_dir", str(out), "--cache_dir", session_cache]) == 2
    assert one_error_line("merge.py") == f"merge.py: error: {expected}"
    assert not out.exists()
    # --tasks agreeing with the metadata, or naming the task of a model without metadata, is accepted
    assert task_of(shapes, {"task": "shapes"}, "shapes") == "shapes"
    assert task_of("bare.safetensors", None, "digits") == "digits"
    assert task_of(shapes, {"task": "shapes"}, None) == "shapes"


def test_two_models_on_one_task_are_refused(tmp_path):
    a, b, c = (str(tmp_path / f"{n}.safetensors") for n in ("a", "b", "c"))
    metas = [{"task": "shapes"}, {"task": "colours"}, {"task": "shapes"}]
    with pytest.raises(MergeInputError) as error:
        model_tasks([a, b, c], metas, None)
    assert str(error.value) == (f"{a} and {c} are both fine-tuned on task shapes; a merge takes one model per task: "
                                "leave one of them out")
    with pytest.raises(MergeInputError, match="both fine-tuned on task digits"):  # also when --tasks names them
        model_tasks([a, b], [None, None], ["digits", "digits"])
    assert model_tasks([a, b], metas[:2], None) == ["shapes", "colours"]


# -- run folders and checkpoints ---------------------------------------------------------------------
def _config(root: Path, task: str, name="embedded", dirpath=None) -> dict:
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": dirpath}}]
    return {"data": {"task": task}, "trainer": {"default_root_dir": str(root), "callbacks": callbacks, "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(root), "name": name}}}}


def _fake_checkpoint(path: Path, task: str, mtime: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "global_step": 1, "hyper_parameters": {"task": task},
                "datamodule_hyper_parameters": {"task": task}}, path)
    os.utime(path, (mtime, mtime))
    return path


def test_run_folders_are_named_by_task():
    for name, task, expected in [("embedded", "shapes", "embedded_shapes"), ("embedded_shapes", "shapes", "embedded_shapes"),
                                 ("shapes/run", "shapes", "shapes/run"), ("vitb32", "stanford_cars", "vitb32_stanford_cars"),
                                 ("cars_run", "stanford_cars", "cars_run_stanford_cars"), (None, "digits", "lightning_logs_digits")]:
        config = _config(Path("/runs"), task, name=name)
        _name_runs_by_task(config)
        assert config["trainer"]["logger"]["init_args"]["name"] == expected, (name, task)


def test_ckpt_path_last_looks_only_at_this_tasks_checkpoints(tmp_path):
    shared = tmp_path / "shared"
    mine = _fake_checkpoint(tmp_path / "embedded_shapes/version_0/checkpoints/last.ckpt", "shapes", 1_000)
    _fake_checkpoint(tmp_path / "embedded_digits/version_0/checkpoints/last.ckpt", "digits", 3_000)
    _fake_checkpoint(tmp_path / "hpc_ckpt_1.ckpt", "digits", 2_000)  # the shared default_root_dir: newer, another task
    _fake_checkpoint(shared / "last.ckpt", "digits", 4_000)  # a ModelCheckpoint dirpath shared by the tasks
    config = _config(tmp_path, "shapes", dirpath=str(shared))
    _name_runs_by_task(config)
    assert _find_last_checkpoint(config) == str(mine)
    assert _find_last_checkpoint({**_config(tmp_path, "colours"), "trainer": {
        **_config(tmp_path, "colours")["trainer"], "callbacks": []}}) is None  # nothing of colours


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test"])
def test_explicit_checkpoint_of_another_task_is_refused(subcommand, tmp_path, session_cache, one_error_line):
    ckpt = _fake_checkpoint(tmp_path / "embedded_digits/version_0/checkpoints/last.ckpt", "digits", 1_000)
    assert checkpoint_task(torch.load(ckpt, weights_only=True)) == "digits"
    root = tmp_path / "runs"
    rc = train.cli_main([subcommand, "--config", CONFIG, "--data.task", "shapes", "--model.init_args.cache_dir", session_cache,
                         "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
                         "--ckpt_path", str(ckpt), *TINY])
    assert rc == 2
    assert one_error_line("train.py") == (
        f"train.py: error: --ckpt_path {ckpt} is a checkpoint of task digits, not of --data.task shapes; pass "
        "--data.task digits or a checkpoint of a shapes run")
    assert not root.exists()


def test_resume_last_picks_this_tasks_run_although_another_task_is_newer(tmp_path, capsys, session_cache):
    """The README's resume command after a shapes run and a newer digits run in the same output folder."""
    root = tmp_path / "runs"

    def fit(task: str, *extra: str):
        return train.main(["fit", "--config", CONFIG, "--data.task", task, "--model.init_args.cache_dir", session_cache,
                           "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
                           *TINY, *extra])

    fit("shapes")
    fit("digits")
    assert sorted(p.relative_to(root).as_posix() for p in root.glob("*/version_*")) == [
        "embedded_digits/version_0", "embedded_shapes/version_0"]
    capsys.readouterr()
    cli = fit("shapes", "--trainer.max_steps", "3", "--ckpt_path", "last")
    assert f"train.py: resuming from {root}/embedded_shapes/version_0/checkpoints/last.ckpt" in capsys.readouterr().err
    export = next(cb.written for cb in cli.trainer.callbacks if hasattr(cb, "written"))
    meta = json.loads(Path(export).with_suffix(".json").read_text())
    assert Path(export).parent == root / "embedded_shapes/version_1"
    assert meta["task"] == "shapes" and meta["global_step"] == 3  # resumed at step 2 of the shapes run
