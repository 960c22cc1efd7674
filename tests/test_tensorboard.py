"""TensorBoard output of tiny train.py runs, read back with TensorBoard's event reader and its real web server."""

import io
import json
import math
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, metadata

import train
from callbacks.tensorboard import TensorBoardHparamsAndImages, log_figure, log_scalars
from datamodules.triggers import unnormalise

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1",
         "--trainer.enable_progress_bar", "false",
         "--data.synthetic_train_size", "200", "--data.synthetic_test_size", "40", "--data.batch_size", "16"]
STABLE_TRAIN = ("train/loss", "val/loss", "val/acc")
STABLE_ATTACK = ("val/asr", "val/ra", "val/clean_to_target")


def _fit(root: Path, cache: str, configs: list[str]):
    args = ["fit", *[x for c in configs for x in ("--config", str(ROOT / c))], "--model.init_args.cache_dir", cache,
            "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root), *QUICK]
    cli = train.main(args)
    return cli, Path(cli.trainer.log_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, session_cache):
    """A clean fine-tune and a BadNets injection of 4 steps (val at steps 2 and 4) under one log root."""
    root = tmp_path_factory.mktemp("tb")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before conftest's one-thread fixture
    try:
        finetune = _fit(root / "finetune", session_cache, ["configs/experiment/embedded_finetune.yaml"])
        attack = _fit(root / "attack", session_cache, ["configs/experiment/embedded_injection.yaml",
                                                       "configs/attack/embedded_badnets.yaml"])
    finally:
        torch.set_num_threads(threads)
    return root, {"finetune": finetune, "attack": attack}


def _events(log_dir: Path) -> EventAccumulator:
    return EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0}).Reload()


def _session(ea: EventAccumulator):
    content = ea.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    values = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    return values, end


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_finetune_scalars_and_hparams_with_final_metrics(runs):
    _, by_name = runs
    cli, log_dir = by_name["finetune"]
    ea = _events(log_dir)
    tags = ea.Tags()["scalars"]
    for tag in STABLE_TRAIN:
        assert tag in tags, tag
    assert "hp_metric" not in tags  # Lightning's placeholder session is off
    assert len(ea.Scalars("val/acc")) == 2  # validation at steps 2 and 4
    final = cli.trainer.callback_metrics["val/acc"].item()
    assert ea.Scalars("val/acc")[-1].value == pytest.approx(final, abs=1e-7)  # what the HPARAMS tab shows
    assert ea.Tags()["images"] == []  # no trigger, no images

    hparams, end = _session(ea)
    assert end.status == api_pb2.STATUS_SUCCESS
    assert hparams["model"] == "FineTune" and hparams["task"] == "shapes"
    assert hparams["lr"] == pytest.approx(1e-3) and hparams["warmup_steps"] == 30 and hparams["pretrained"] == "None"
    assert hparams["data.batch_size"] == 16 and hparams["data.synthetic_train_size"] == 200
    assert hparams["trainer.max_steps"] == 4 and hparams["seed_everything"] == 0 and hparams["data.seed"] == 0
    assert "data.task" not in hparams and "data.cache_dir" not in hparams  # linked to the module's
    assert not [k for k in hparams if k.startswith("_")]  # LightningCLI's _class_path / _instantiator


def test_train_acc_is_one_tag(runs):
    """train/acc, not Lightning's train/acc_step + train/acc_epoch split (on_step together with on_epoch)."""
    for name, (_, log_dir) in runs[1].items():
        tags = _events(log_dir).Tags()["scalars"]
        assert "train/acc" in tags and not {"train/acc_step", "train/acc_epoch"} & set(tags), (name, tags)


def test_attack_scalars_hparams_and_unnormalised_trigger_images(runs):
    _, by_name = runs
    cli, log_dir = by_name["attack"]
    model = cli.model
    ea = _events(log_dir)
    tags = ea.Tags()["scalars"]
    for tag in (*STABLE_TRAIN, *STABLE_ATTACK, "train/backdoor_loss", "val/asr_hits", "val/asr_total"):
        assert tag in tags, tag
    for tag in ("val/acc", *STABLE_ATTACK):
        assert ea.Scalars(tag)[-1].value == pytest.approx(cli.trainer.callback_metrics[tag].item(), abs=1e-7), tag
    hparams, end = _session(ea)
    assert end.status == api_pb2.STATUS_SUCCESS
    assert hparams["model"] == "BackdoorInjection" and hparams["attack"] == "badnets"
    assert hparams["trigger.kind"] == "patch" and hparams["trigger.size"] == 6 and hparams["alpha"] == 5
    assert hparams["poison_fraction"] == 0.25 and hparams["target_class"] == 1

    assert set(ea.Tags()["images"]) == {"trigger/patch", "trigger/samples"}
    (patch_event,), (grid_event,) = ea.Images("trigger/patch"), ea.Images("trigger/samples")
    assert patch_event.step == grid_event.step == 0  # once, at fit start
    patch = _png(patch_event.encoded_image_string)
    assert patch.shape == (96, 96, 3)  # the 6 px patch scaled ×16
    pixels = unnormalise(model.trigger_tensor, model.mean, model.std)  # (3, 6, 6) in [0, 1]
    expected = (pixels.permute(1, 2, 0).numpy() * 255).repeat(16, 0).repeat(16, 1)
    assert np.abs(patch.astype(float) - expected).max() <= 1.0  # mean/std undone, not normalised values
    grid = _png(grid_event.encoded_image_string)
    assert grid.shape == (2 * 96 + 3 * 2, 4 * 96 + 5 * 2, 3)  # 8 samples of 24 px ×4, 4 per row, padding 2
    for row in range(2):
        for col in range(4):
            top, left = 2 + row * 98, 2 + col * 98
            corner = grid[top + 72: top + 96, left + 72: left + 96]  # bottom-right 6 px of the sample, ×4
            assert np.array_equal(corner, patch[::4, ::4])  # every sample carries the trigger
    # The samples are read by index under a forked RNG: the training data order is untouched.
    state = torch.get_rng_state()
    samples = TensorBoardHparamsAndImages()._val_samples(cli.trainer)
    assert samples.shape == (8, 3, 24, 24) and torch.equal(torch.get_rng_state(), state)


def test_plot_and_log_merge_scalars_and_figure(tmp_path):
    from experiments.report import plot_and_log

    rows = [{"scenario": "clean", "merge": "task_arithmetic", "attack": None, "coefficient": c,
             "mean_clean_acc": 0.8 - c / 10} for c in (0.3, 0.6)]
    for name, asr in (("attack_badnets", 0.2), ("attack_badmerging_ontask", 0.9)):
        rows += [{"scenario": name, "merge": "task_arithmetic", "coefficient": c, "asr": asr * c / 0.6,
                  "mean_clean_acc": 0.7, "attack": {"label": name, "in_merge": True}} for c in (0.3, 0.6)]
    png = plot_and_log(tmp_path, rows, [0.3, 0.6])
    assert png.is_file()
    ea = _events(tmp_path / "tensorboard")
    scalars = ea.Tags()["scalars"]
    assert set(scalars) == {"merge/task_arithmetic/clean/mean_acc",
                            *(f"merge/task_arithmetic/{n}/{m}" for n in ("attack_badnets", "attack_badmerging_ontask")
                              for m in ("asr", "mean_acc"))}
    asr = ea.Scalars("merge/task_arithmetic/attack_badmerging_ontask/asr")
    assert [e.step for e in asr] == [30, 60] and [e.value for e in asr] == pytest.approx([0.45, 0.9])
    (figure,) = ea.Images("merge/task_arithmetic/asr_ca_vs_coefficient")
    image = _png(figure.encoded_image_string)
    assert image.shape[1] > image.shape[0] > 100 and image.std() > 0  # two panels side by side, not blank


def test_helpers_log_figure_and_scalars(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 3))
    ax.imshow([[1.0, 0.2], [0.2, 1.0]], vmin=-1, vmax=1, cmap="RdBu_r")
    log_figure(tmp_path, "bv/cosine", fig, step=3)
    assert not plt.fignum_exists(fig.number)  # closed after logging
    log_scalars(tmp_path, {"bv/norm/badnets": 1.5, "bv/norm/badmerging": 2.5}, step=3)
    ea = _events(tmp_path)
    (event,) = ea.Images("bv/cosine")
    assert event.step == 3 and _png(event.encoded_image_string).std() > 0
    assert [(e.step, e.value) for e in ea.Scalars("bv/norm/badmerging")] == [(3, 2.5)]
    with pytest.raises(ValueError, match="num_samples"):
        TensorBoardHparamsAndImages(num_samples=-1)


def test_failed_run_is_marked_failed_and_hp_metric_is_off(tmp_path):
    """A plain Trainer with a default TensorBoardLogger: one session, no hp_metric, status failed on error."""
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel
    from lightning.pytorch.loggers import TensorBoardLogger

    class Boom(L.Callback):
        def on_train_batch_end(self, *args, **kwargs):
            raise RuntimeError("boom")

    logger = TensorBoardLogger(tmp_path, name="run")  # default_hp_metric=True
    trainer = L.Trainer(max_steps=3, logger=logger, callbacks=[TensorBoardHparamsAndImages(), Boom()],
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(BoringModel())
    ea = _events(Path(logger.log_dir))
    hparams, end = _session(ea)
    assert end.status == api_pb2.STATUS_FAILURE
    assert hparams["model"] == "BoringModel" and hparams["trainer.max_steps"] == 3
    assert "hp_metric" not in ea.Tags()["scalars"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(base: str, path: str, data: bytes | None = None) -> bytes:
    request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(request, timeout=20) as response:
        return response.read()


def _get_json(base: str, path: str, **query):
    return json.loads(_get(base, path + ("?" + urllib.parse.urlencode(query) if query else "")))


def test_tensorboard_server_serves_scalars_images_and_hparams(runs, tmp_path):
    """The real ``tensorboard`` over the tiny runs' log root, read through the HTTP API its web page uses."""
    root, by_name = runs
    run_of = {name: str(log_dir.relative_to(root)) for name, (_, log_dir) in by_name.items()}
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "tensorboard.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(root), "--port", str(port),
                               "--host", "127.0.0.1", "--load_fast", "false", "--reload_interval", "0"],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, tags = time.monotonic() + 60, {}
        while time.monotonic() < deadline:
            assert server.poll() is None, (tmp_path / "tensorboard.log").read_text()
            try:
                tags = _get_json(base, "/data/plugin/scalars/tags")
            except OSError:
                tags = {}
            if all(run in tags for run in run_of.values()):
                break
            time.sleep(0.5)
        assert set(run_of.values()) <= set(tags), (tags, (tmp_path / "tensorboard.log").read_text())
        assert set(STABLE_TRAIN) <= set(tags[run_of["finetune"]])
        assert set(STABLE_TRAIN) | set(STABLE_ATTACK) <= set(tags[run_of["attack"]])

        cli = by_name["attack"][0]
        points = _get_json(base, "/data/plugin/scalars/scalars", run=run_of["attack"], tag="val/asr")
        assert [p[1] for p in points] == [e.step for e in _events(by_name["attack"][1]).Scalars("val/asr")]
        assert len(points) == 2  # [wall_time, step, value] per validation
        assert points[-1][2] == pytest.approx(cli.trainer.callback_metrics["val/asr"].item(), abs=1e-7)

        images = _get_json(base, "/data/plugin/images/tags")
        assert set(images[run_of["attack"]]) == {"trigger/patch", "trigger/samples"}
        (entry,) = _get_json(base, "/data/plugin/images/images", run=run_of["attack"], tag="trigger/samples")
        assert entry["step"] == 0
        grid = _png(_get(base, "/data/plugin/images/individualImage?" + entry["query"]))
        assert grid.shape == (198, 394, 3) and grid.std() > 0

        # HPARAMS tab: one session per run, its metric columns = the runs' last scalar values.
        request = {"experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
                                                             "STATUS_RUNNING"],
                   "colParams": [], "startIndex": 0, "sliceSize": 100, "includeMetrics": True}
        groups = json.loads(_get(base, "/data/plugin/hparams/session_groups", json.dumps(request).encode()))
        sessions = {s["name"]: (g, s) for g in groups["sessionGroups"] for s in g["sessions"]}
        assert set(sessions) == set(run_of.values())
        for name, (run_cli, _) in by_name.items():
            group, session = sessions[run_of[name]]
            assert session["status"] == "STATUS_SUCCESS"
            metrics = {m["name"]["tag"]: m["value"] for m in session["metricValues"] if not m["name"].get("group")}
            assert metrics["val/acc"] == pytest.approx(run_cli.trainer.callback_metrics["val/acc"].item(), abs=1e-7)
            assert group["hparams"]["model"] == type(run_cli.model).__name__
        attack_metrics = {m["name"]["tag"]: m["value"] for m in sessions[run_of["attack"]][1]["metricValues"]}
        assert math.isclose(attack_metrics["val/asr"], cli.trainer.callback_metrics["val/asr"].item(), abs_tol=1e-7)
        assert sessions[run_of["attack"]][0]["hparams"]["attack"] == "badnets"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
