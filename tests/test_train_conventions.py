"""Lightning conventions of train.py: an lr tag in TensorBoard (LearningRateMonitor in every training config),
validation and logging intervals that follow a smaller ``--trainer.max_steps``, the optimiser recipe not
replaceable from the command line, and ``fit --help`` building only the fit parser."""

import glob
import json
from pathlib import Path

import pytest
import yaml

import train
from experiments import training
from experiments.training import _follow_max_steps

CONFIG = "configs/experiment/embedded_finetune.yaml"
CONFIGS = sorted(glob.glob("configs/experiment/*.yaml"))


def _args(root: Path, cache: str, *extra: str) -> list[str]:
    return ["fit", "--config", CONFIG, "--data.task", "shapes", "--model.init_args.cache_dir", cache,
            "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
            "--trainer.enable_progress_bar", "false", "--data.synthetic_train_size", "64",
            "--data.synthetic_test_size", "16", "--data.batch_size", "16", *extra]


@pytest.mark.parametrize("path", CONFIGS)
def test_every_training_config_logs_the_learning_rate(path):
    callbacks = yaml.safe_load(Path(path).read_text())["trainer"]["callbacks"]
    monitors = [c for c in callbacks if c["class_path"] == "lightning.pytorch.callbacks.LearningRateMonitor"]
    assert [m["init_args"]["logging_interval"] for m in monitors] == ["step"], path


def test_short_run_validates_logs_and_has_an_lr_tag(tmp_path, session_cache, monkeypatch):
    """``--trainer.max_steps 3`` with the config's 400 / 20 step intervals: validation and logging at step 3."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    infos: list[str] = []
    monkeypatch.setattr(training, "rank_zero_info", infos.append)
    cli = train.main(_args(tmp_path, session_cache, "--trainer.max_steps", "3"))
    assert infos == ["train.py: --trainer.max_steps 3 is below the configured interval (val_check_interval 400 -> 3, "
                     "log_every_n_steps 20 -> 3); validating and logging at the last step"]
    assert (cli.trainer.val_check_interval, cli.trainer.log_every_n_steps) == (3, 3)
    log_dir = Path(cli.trainer.log_dir)
    meta = json.loads((log_dir / "encoder.json").read_text())
    assert meta["global_step"] == 3 and meta["metrics"]["val/acc_total"] > 0  # validation ran
    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert {"lr-AdamW", "train/loss", "val/acc"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("lr-AdamW")] == [2]  # logged at the third (last) step
    saved = yaml.safe_load((log_dir / "config.yaml").read_text())["trainer"]
    assert (saved["val_check_interval"], saved["log_every_n_steps"]) == (3, 3)  # config.yaml says what ran


def test_intervals_follow_only_a_smaller_positive_max_steps(monkeypatch):
    monkeypatch.setattr(training, "rank_zero_info", lambda message: None)
    for trainer, expected in [
        ({"max_steps": 3, "val_check_interval": 400, "log_every_n_steps": 20}, (3, 3)),
        ({"max_steps": 50, "val_check_interval": 400, "log_every_n_steps": 20}, (50, 20)),
        ({"max_steps": 500, "val_check_interval": 400, "log_every_n_steps": 20}, (400, 20)),
        ({"max_steps": -1, "val_check_interval": 400, "log_every_n_steps": 20}, (400, 20)),  # epoch-bound runs
        ({"max_steps": 3, "val_check_interval": 0.5, "log_every_n_steps": 1}, (0.5, 1)),  # a fraction of an epoch
        ({"max_steps": 3, "val_check_interval": None, "log_every_n_steps": None}, (None, None)),
    ]:
        config = {"trainer": dict(trainer)}
        _follow_max_steps(config)
        assert (config["trainer"]["val_check_interval"], config["trainer"]["log_every_n_steps"]) == expected, trainer


@pytest.mark.parametrize("flag,value", [("--optimizer", "torch.optim.SGD"),
                                        ("--lr_scheduler", "torch.optim.lr_scheduler.ConstantLR")])
def test_optimizer_recipe_cannot_be_replaced_from_the_command_line(flag, value, tmp_path, session_cache, one_error_line):
    root = tmp_path / "runs"
    assert train.cli_main(_args(root, session_cache, flag, value, "--trainer.max_steps", "2")) == 2
    assert one_error_line("train.py") == (
        f"train.py: error: {flag} would replace the module's own recipe (AdamW + warm-up/cosine; UniversalTrigger: its "
        "optimizer argument) while the export's metadata still records it; refused: set --model.init_args.lr / "
        "--model.init_args.weight_decay / --model.init_args.warmup_steps (UniversalTrigger: "
        "--model.init_args.optimizer) instead")
    assert not root.exists()


def test_fit_help_builds_only_the_fit_parser_and_lists_its_keys(capsys, monkeypatch):
    built: list[str] = []
    original = training.TrainingCLI._prepare_subcommand_parser

    def spy(self, klass, subcommand, **kwargs):
        built.append(subcommand)
        return original(self, klass, subcommand, **kwargs)

    monkeypatch.setattr(training.TrainingCLI, "_prepare_subcommand_parser", spy)
    with pytest.raises(SystemExit) as done:
        train.main(["fit", "--help"])
    assert done.value.code == 0 and built == ["fit"]
    out = capsys.readouterr().out
    assert all(key in out for key in ("--data.task", "--trainer.max_steps", "--ckpt_path", "--model", "--optimizer"))
    built.clear()
    with pytest.raises(SystemExit):
        train.main(["--help"])  # no subcommand first: every subcommand, as Lightning lists them
    assert built == ["fit", "validate", "test", "predict"]
    assert "{fit,validate,test,predict}" in capsys.readouterr().out
