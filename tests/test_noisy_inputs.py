"""Noisy entry-point inputs (ERRORS.md): ``--device`` and ``--trainer.accelerator`` / ``--trainer.devices`` checked
against this machine before any work, truncated checkpoints for fit / validate / test, Ctrl-C as one line and exit
status 130 with no partial outputs, the unknown merge method's list taken from the registry, ``--tasks_file`` on
every entry point, and ``--help`` without importing torch where the parser does not need it."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import bv
import merge
import pipeline
import sweep
import train
from experiments import cli, nodes, training

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/experiment/embedded_finetune.yaml"
HEAVY = ("torch", "lightning", "open_clip", "datasets")
BADNETS = "configs/attack/embedded_badnets.yaml"
BV_RUNS = [{"name": "a", "configs": [BADNETS]}, {"name": "b", "configs": [BADNETS], "seed": 1}]  # two paired runs


def _files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _train_args(root: Path, cache: str, *extra: str, config: str = CONFIG) -> list[str]:
    return ["fit", "--config", config, "--data.task", "shapes", "--model.init_args.cache_dir", cache,
            "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
            "--trainer.enable_progress_bar", "false", "--data.synthetic_train_size", "64",
            "--data.synthetic_test_size", "16", "--data.batch_size", "16", "--trainer.max_steps", "2", *extra]


def _interrupt(*_args, **_kwargs):
    """Ctrl-C as the terminal sends it: SIGINT to this process, delivered at the next bytecode."""
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)  # never reached: the handler raises first
    raise AssertionError("SIGINT was not delivered")


# -- --device (merge.py, bv.py) ------------------------------------------------------------------------------
def test_resolve_device_against_this_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.resolve_device("auto") == "cpu" and cli.resolve_device("cpu") == "cpu"
    with pytest.raises(cli.UserError, match=r"^--device cuda: this machine has no usable CUDA GPU"):
        cli.resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cli.resolve_device("auto") == "cuda" and cli.resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(cli.UserError) as e:
        cli.resolve_device("cuda:9")
    assert str(e.value) == "--device cuda:9: no such GPU, this machine has 1 (cuda:0 .. cuda:0); pick one of them, or --device cuda"
    for bad in ("banana", "cuda:x", "", "cuda:-1"):
        with pytest.raises(cli.UserError, match="is not a device; use cpu, cuda, cuda:N"):
            cli.resolve_device(bad)
    with pytest.raises(cli.UserError, match=r"device type 'meta' is not supported"):
        cli.resolve_device("meta")


@pytest.mark.parametrize("device,expected", [
    ("banana", "--device 'banana' is not a device; use cpu, cuda, cuda:N (N < the GPU count), mps or auto"),
    ("cuda:9", "--device cuda:9: this machine has no usable CUDA GPU (torch.cuda.is_available() is False); use "
               "--device cpu (or auto)"),
])
def test_merge_refuses_a_device_before_any_work(device, expected, models, tmp_path, monkeypatch, one_error_line):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cache, out, export = tmp_path / "cache", tmp_path / "out", tmp_path / "merged.safetensors"
    assert merge.main(["--models", *map(str, models), "--device", device, "--cache_dir", str(cache), "--out_dir",
                       str(out), "--export", str(export)]) == 2
    assert one_error_line("merge.py") == f"merge.py: error: {expected}"
    assert _files_under(tmp_path) == []  # no cache, no output, no export


def test_bv_refuses_a_device_and_gpu_ids_this_machine_lacks(tmp_path, monkeypatch, one_error_line):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(nodes.RUNNERS, "train", lambda *a: pytest.fail("bad input must stop before any training"))
    base = ["analyze", "--runs", json.dumps(BV_RUNS), "--out_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")]
    assert bv.cli_main([*base, "--device", "banana"]) == 2
    assert one_error_line("bv.py").startswith("bv.py: error: --device 'banana' is not a device")
    assert bv.cli_main([*base, "--devices", "0", "1"]) == 2
    assert one_error_line("bv.py") == ("bv.py: error: --devices 0 1: [0, 1] not on this machine, which has no usable "
                                       "CUDA GPU; leave --devices out (trainings on CPU)")
    assert _files_under(tmp_path) == []


# -- --trainer.accelerator / --trainer.devices (train.py) ----------------------------------------------------
@pytest.fixture
def no_gpu(monkeypatch):
    """This machine without CUDA or MPS, as Lightning's accelerators see it (the same on a GPU machine)."""
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

    for accelerator in (CUDAAccelerator, MPSAccelerator):
        monkeypatch.setattr(accelerator, "is_available", staticmethod(lambda: False))


@pytest.mark.parametrize("flags,expected", [
    (["--trainer.accelerator", "gpu"], "--trainer.accelerator=gpu: torch finds no GPU (CUDA or MPS) on this machine; "
                                       "use --trainer.accelerator cpu, or auto (a GPU when there is one)"),
    (["--trainer.accelerator", "cuda"], "--trainer.accelerator=cuda: torch finds no CUDA GPU on this machine; use "
                                        "--trainer.accelerator cpu, or auto (a GPU when there is one)"),
    (["--trainer.accelerator", "banana"], "--trainer.accelerator='banana' is unknown; use auto, gpu or one of cpu, "
                                          "cuda, mps, tpu"),
])
def test_train_refuses_an_accelerator_this_machine_lacks_before_any_work(flags, expected, no_gpu, tmp_path,
                                                                         one_error_line):
    root, cache = tmp_path / "runs", tmp_path / "cache"
    assert train.cli_main(_train_args(root, str(cache), *flags)) == 2
    assert one_error_line("train.py") == f"train.py: error: {expected}"
    assert _files_under(tmp_path) == []  # no log directory, no rendered data, no zero-shot head


def test_train_refuses_more_devices_than_the_machine_has(tmp_path, monkeypatch, one_error_line):
    from lightning.pytorch.accelerators import CUDAAccelerator

    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: True))
    monkeypatch.setattr(CUDAAccelerator, "auto_device_count", staticmethod(lambda: 1))
    monkeypatch.setattr(CUDAAccelerator, "parse_devices", staticmethod(lambda d: [0] if d in (1, "1", [0]) else
                                                                        (_ for _ in ()).throw(ValueError(d))))
    root, cache = tmp_path / "runs", tmp_path / "cache"
    assert train.cli_main(_train_args(root, str(cache), "--trainer.accelerator", "cuda", "--trainer.devices", "4")) == 2
    assert one_error_line("train.py") == ("train.py: error: --trainer.devices=4 does not fit this machine, which has 1 "
                                          "CUDA GPU(s) (ids 0..0); pass a count up to 1, ids among them, or auto")
    assert _files_under(tmp_path) == []


# -- truncated checkpoints (fit, validate, test) ---------------------------------------------------------------
@pytest.mark.parametrize("subcommand", ["fit", "validate", "test"])
def test_a_checkpoint_cut_in_half_is_one_line_naming_it(subcommand, tmp_path, session_cache, one_error_line):
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.randn(200_000)}, "global_step": 7, "epoch": 0,
                "datamodule_hyper_parameters": {"task": "shapes"}}, ckpt)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    root = tmp_path / "runs"
    args = [subcommand, *_train_args(root, session_cache)[1:], "--ckpt_path", str(ckpt)]
    assert train.cli_main(args) == 2
    assert one_error_line("train.py") == (
        f"train.py: error: --ckpt_path {ckpt} is not a readable checkpoint (PytorchStreamReader failed reading zip "
        "archive: failed finding central directory); it may be truncated: use another (e.g. an earlier "
        "version_*/checkpoints/last.ckpt)")
    assert not root.exists()


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_validate_and_test_load_checkpoints_weights_only(subcommand, tmp_path, session_cache, monkeypatch):
    import lightning as L

    ckpt = tmp_path / "shapes.ckpt"
    torch.save({"state_dict": {}, "datamodule_hyper_parameters": {"task": "shapes"}}, ckpt)
    calls = []

    @functools.wraps(getattr(L.Trainer, subcommand))  # LightningCLI reads the method's signature for its keys
    def record(self, *args, **kwargs):
        calls.append(kwargs)
        return []

    monkeypatch.setattr(L.Trainer, subcommand, record)
    train.main([subcommand, *_train_args(tmp_path / "runs", session_cache)[1:], "--ckpt_path", str(ckpt)])
    assert len(calls) == 1 and calls[0]["weights_only"] is True and calls[0]["ckpt_path"] == str(ckpt)


# -- Ctrl-C ------------------------------------------------------------------------------------------------------
def test_run_cli_turns_ctrl_c_into_one_line_after_the_cleanup(capsys):
    before = signal.getsignal(signal.SIGINT)
    cleaned = []
    assert cli.run_cli("x.py", _interrupt, cleanup=lambda: cleaned.append(1), interrupted="kept y; rerun") == 130
    assert capsys.readouterr().err == "x.py: interrupted; kept y; rerun\n" and cleaned == [1]
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is back

    def detail():
        raise cli.Interrupted("what the code that knows says")

    assert cli.run_cli("x.py", detail) == 130
    assert capsys.readouterr().err == "x.py: interrupted; what the code that knows says\n"
    assert cli.run_cli("x.py", lambda: (_ for _ in ()).throw(KeyboardInterrupt())) == 130  # raised by other code
    assert capsys.readouterr().err == "x.py: interrupted; the run stopped before it finished; rerun the command\n"


def test_train_ctrl_c_keeps_the_last_checkpoint_and_the_same_command_resumes(tmp_path, session_cache, monkeypatch,
                                                                             one_error_line, capsys):
    config = yaml.safe_load(Path(CONFIG).read_text())
    config["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"save_last": True, "save_top_k": 0, "every_n_train_steps": 2}},
        {"class_path": "callbacks.export.ExportEncoder"}]
    every_2 = tmp_path / "every_2.yaml"
    every_2.write_text(yaml.safe_dump(config))
    root = tmp_path / "runs"
    args = _train_args(root, session_cache, "--trainer.max_steps", "4", config=str(every_2))
    original = training._RunTracker.on_train_batch_end

    def ctrl_c_at_step_3(self, trainer, *rest, **kwargs):
        original(self, trainer, *rest, **kwargs)
        if trainer.global_step == 3:
            _interrupt()

    monkeypatch.setattr(training._RunTracker, "on_train_batch_end", ctrl_c_at_step_3)
    assert train.cli_main(args) == 130
    kept = root / "embedded_shapes" / "version_0" / "checkpoints" / "last.ckpt"
    assert one_error_line("train.py", "interrupted") == (
        f"train.py: interrupted; the last checkpoint {kept} is kept; resume with the same command plus --ckpt_path last")
    assert torch.load(kept, weights_only=True)["global_step"] == 2
    assert not list(root.rglob("encoder.safetensors"))  # nothing exported from the unfinished run

    monkeypatch.setattr(training._RunTracker, "on_train_batch_end", original)
    assert train.cli_main([*args, "--ckpt_path", "last"]) == 0
    assert f"train.py: resuming from {kept}" in capsys.readouterr().err
    export = next(root.rglob("encoder.safetensors"))
    assert json.loads(export.with_suffix(".json").read_text())["global_step"] == 4


def test_merge_ctrl_c_after_the_export_leaves_no_partial_outputs(models, tmp_path, session_cache, monkeypatch,
                                                                 one_error_line):
    import evaluation.rows

    monkeypatch.setattr(evaluation.rows, "write_results", _interrupt)  # after the merge was exported and evaluated
    out, export = tmp_path / "deep" / "out", tmp_path / "merged.safetensors"
    assert merge.main(["--models", *map(str, models), "--coefficients", "0.3", "--export", str(export), "--out_dir",
                       str(out), "--individual", "false", "--zero_shot", "false", "--eval_tasks", "shapes",
                       "--synthetic_train_size", "64", "--synthetic_test_size", "16", "--val_max_examples", "8",
                       "--cache_dir", session_cache]) == 130
    assert one_error_line("merge.py", "interrupted") == (
        "merge.py: interrupted; nothing was written (partial outputs removed; caches kept); rerun the command")
    assert _files_under(tmp_path) == []


def test_pipeline_sweep_and_bv_ctrl_c_name_the_cache_they_resume_from(tmp_path, monkeypatch, one_error_line):
    monkeypatch.setitem(nodes.RUNNERS, "train", _interrupt)  # Ctrl-C during the first training
    cache = tmp_path / "cache"
    assert pipeline.main(["--quick", "--out_dir", str(tmp_path / "out"), "--cache_dir", str(cache)]) == 130
    artifacts = cache / "artifacts"
    assert one_error_line("pipeline.py", "interrupted") == (
        f"pipeline.py: interrupted; finished steps are kept in {artifacts} (an unfinished training's checkpoints in "
        f"{artifacts / '.work'}); rerun the same command to resume from there")
    assert not (tmp_path / "out").exists()  # the --out_dir this run created (spec.yaml) is removed

    grid = {"out_dir": str(tmp_path / "sweep"), "cache_dir": str(cache), "tasks": ["shapes", "digits"],
            "grid": {"attacks": ["none"], "methods": ["task_arithmetic"], "coefficients": [0.3], "defenses": ["none"],
                     "seeds": [0]}, "defenses": {"none": []}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(grid))
    assert sweep.main(["--config", str(tmp_path / "sweep.yaml")]) == 130
    assert one_error_line("sweep.py", "interrupted") == (
        f"sweep.py: interrupted; every finished cell is kept in {tmp_path / 'sweep' / 'results.jsonl'} (and its models "
        "in the cache); rerun the same command to resume with the cells still to do")

    assert bv.cli_main(["analyze", "--runs", json.dumps(BV_RUNS), "--out_dir", str(tmp_path / "bv"),
                        "--cache_dir", str(cache)]) == 130
    assert one_error_line("bv.py", "interrupted") == (
        f"bv.py: interrupted; every finished training is kept in {artifacts} (an unfinished one's checkpoints in "
        f"{artifacts / '.work'}); rerun the same command to resume from there")


def test_pipeline_failing_after_its_checks_removes_the_out_dir_it_created(tmp_path, monkeypatch, one_error_line):
    def fails(*_args):
        raise ValueError("a training failed")

    monkeypatch.setitem(nodes.RUNNERS, "train", fails)
    out = tmp_path / "new" / "out"
    assert pipeline.main(["--quick", "--out_dir", str(out), "--cache_dir", str(tmp_path / "cache")]) == 2
    assert one_error_line("pipeline.py") == "pipeline.py: error: a training failed"
    assert not (tmp_path / "new").exists()
    out.mkdir(parents=True)  # an --out_dir that existed before the run is left alone
    (out / "results.json").write_text("{}")
    assert pipeline.main(["--quick", "--out_dir", str(out), "--cache_dir", str(tmp_path / "cache")]) == 2
    assert (out / "results.json").read_text() == "{}"
    one_error_line("pipeline.py")


# -- the unknown merge method: every registered one ------------------------------------------------------------------
def test_unknown_merge_method_lists_every_registered_method(models, tmp_path, monkeypatch, one_error_line):
    from evaluation.merge_methods import REGISTRY, TaskArithmetic

    class Fisher(TaskArithmetic):
        name = "fisher_demo"

    monkeypatch.setitem(REGISTRY._classes, "fisher_demo", Fisher)  # a method registered by a user's module
    assert merge.main(["--models", *map(str, models), "--method", "fishr", "--out_dir", str(tmp_path / "out")]) == 2
    names = REGISTRY.names()
    assert {"regmean", "adamerging", "fisher_demo"} <= set(names)
    assert one_error_line("merge.py") == (f"merge.py: error: unknown merge method 'fishr'; known: {', '.join(names)}; "
                                          "or a class path such as my_module.MyMethod")


# -- --tasks_file ------------------------------------------------------------------------------------------------------
@pytest.fixture
def task_registry(monkeypatch):
    """The task registry as it was, after the test (a task file registers tasks process-wide)."""
    from datamodules import task_files, tasks

    monkeypatch.delenv(tasks.TASKS_FILES_ENV, raising=False)
    saved = dict(tasks.TASKS), dict(task_files._FILES), dict(task_files._OWNER)
    yield
    for live, old in zip((tasks.TASKS, task_files._FILES, task_files._OWNER), saved):
        live.clear()
        live.update(old)


def _task_file(tmp_path: Path, name: str = "noisy_fruit") -> Path:
    (tmp_path / "fruit").mkdir()
    path = tmp_path / "fruit.yaml"
    path.write_text(f"tasks:\n  - {{name: {name}, classnames: [red, blue], data_dir: fruit}}\n")
    return path


def test_take_tasks_files_registers_them_and_strips_the_option(tmp_path, task_registry):
    from datamodules.tasks import TASKS

    f = str(_task_file(tmp_path))
    rest, files = cli.take_tasks_files(["fit", "--tasks_file", f, "--a", "1", f"--tasks_file={f}", "--", "--tasks_file"])
    assert rest == ["fit", "--a", "1", "--", "--tasks_file"] and files == [f, f] and "noisy_fruit" in TASKS
    assert cli.take_tasks_files(["--a"]) == (["--a"], [])
    for bad in (["--tasks_file"], ["--tasks_file", "--a"], ["--tasks_file="]):
        with pytest.raises(cli.UserError, match="--tasks_file"):
            cli.take_tasks_files(bad)


def test_every_entry_point_refuses_a_bad_tasks_file_in_one_line(tmp_path, task_registry, monkeypatch, one_error_line):
    monkeypatch.setitem(nodes.RUNNERS, "train", lambda *a: pytest.fail("bad input must stop before any training"))
    nope = tmp_path / "nope.yaml"
    expected = f"task file {nope}: file not found; check the path (configs/tasks/ holds the shipped ones)"
    for prog, entry in {"train.py": train.cli_main, "merge.py": merge.main, "pipeline.py": pipeline.main,
                        "sweep.py": sweep.main, "bv.py": bv.cli_main}.items():
        args = {"train.py": ["fit"], "bv.py": ["analyze"]}.get(prog, [])
        assert entry([*args, "--tasks_file", str(nope), "--out_dir", str(tmp_path / "out")]) == 2, prog
        assert one_error_line(prog) == f"{prog}: error: {expected}"
    assert _files_under(tmp_path) == []


def test_a_tasks_file_task_is_known_to_merge_py(models, tmp_path, task_registry, base, one_error_line):
    """A model fine-tuned on a task only the file defines: unknown without --tasks_file, merged with it."""
    from merging.io import load_metadata, load_state_dict, save_state_dict

    f = _task_file(tmp_path)
    fruit = tmp_path / "fruit.safetensors"
    save_state_dict(fruit, {k: v + 1e-3 for k, v in load_state_dict(models[1]).items()},
                    {**load_metadata(models[1]), "task": "noisy_fruit"})
    export = tmp_path / "merged.safetensors"
    args = ["--models", str(models[0]), str(fruit), "--evaluate", "false", "--export", str(export)]
    assert merge.main(args) == 2
    assert "unknown task 'noisy_fruit'" in one_error_line("merge.py")
    assert merge.main(["--tasks_file", str(f), *args]) == 0 and export.is_file()


def test_pipeline_sweep_and_bv_read_their_other_options_after_the_tasks_file(tmp_path, task_registry, one_error_line):
    f = str(_task_file(tmp_path))
    where = ["--out_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")]
    assert pipeline.main(["--jobs", "0", "--tasks_file", f, *where]) == 2
    assert one_error_line("pipeline.py") == "pipeline.py: error: --jobs=0 must be a positive integer (1: in this process)"
    assert sweep.main([f"--tasks_file={f}", "--array_index", "0", *where]) == 2
    assert one_error_line("sweep.py").startswith("sweep.py: error: --array_index")
    assert bv.cli_main(["analyze", "--tasks_file", f, "--jobs", "0", *where]) == 2
    assert one_error_line("bv.py") == "bv.py: error: --jobs=0 must be a positive integer (1: in this process)"


# -- --help without torch ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [["merge.py", "--help"], ["pipeline.py", "--help"], ["sweep.py", "--help"],
                                     ["train.py", "--help"]])
def test_help_imports_neither_torch_nor_lightning(command):
    code = ("import runpy, sys\n"
            f"sys.argv = {command!r}\n"
            "try:\n"
            f"    runpy.run_path({command[0]!r}, run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    assert e.code in (0, None), e.code\n"
            f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "HEAVY []", done.stdout
    assert "--tasks_file" in done.stdout


def test_train_top_level_help_lists_lightnings_subcommands(capsys):
    from lightning.pytorch.cli import LightningCLI

    assert list(train.SUBCOMMANDS) == list(LightningCLI.subcommands())
    assert train.cli_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "{fit,validate,test,predict}" in out and "--tasks_file PATH" in out
    with pytest.raises(SystemExit) as done:
        train.main(["fit", "--help"])
    assert done.value.code == 0 and "--tasks_file PATH: a YAML file of tasks of your own" in capsys.readouterr().out
