"""train.py (LightningCLI fit) -> export -> merge.py, on the embedded model with tiny data."""

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

import merge
import train
from datamodules.datamodule import TaskDataModule
from merging.io import load_metadata, load_state_dict
from merging.methods import task_arithmetic
from merging.task_vectors import task_vector

QUICK = ["--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false",
         "--data.synthetic_train_size", "200", "--data.synthetic_test_size", "40", "--data.batch_size", "16"]


def _fit(task, tmp_path, cache, extra=()):
    root = tmp_path / task
    cli = train.main(["fit", "--config", "configs/experiment/embedded_finetune.yaml", "--data.task", task,
                      "--model.cache_dir", cache, "--trainer.default_root_dir", str(root),
                      "--trainer.logger.init_args.save_dir", str(root), *QUICK, *extra])
    return cli, root


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, session_cache):
    tmp = tmp_path_factory.mktemp("fit")
    paths = []
    for task in ("shapes", "colours"):
        cli, root = _fit(task, tmp, session_cache)
        paths.append(next(root.rglob("encoder.safetensors")))
    return paths, cli


def test_cli_fit_trains_exports_and_saves_config(two_models, base):
    (shapes, colours), cli = two_models
    meta = load_metadata(shapes)
    assert meta["task"] == "shapes" and meta["kind"] == "finetune"
    assert meta["base_model"]["base_id"] == base.base_id
    assert meta["seed"] == 0 and meta["global_step"] == 4 and meta["code_version"]
    assert set(meta["recipe"]) == {"lr", "weight_decay", "warmup_steps"}
    assert (shapes.parent / "config.yaml").exists()  # every run saves its resolved config
    assert (shapes.parent / "checkpoints" / "last.ckpt").exists()  # resumable
    sd = load_state_dict(shapes)
    theta_pre = base.encoder_state_dict()
    assert sd.keys() == theta_pre.keys()
    assert any(not torch.equal(sd[k], theta_pre[k]) for k in sd)  # it trained


def test_export_load_round_trip(two_models, base):
    (shapes, _), cli = two_models
    sd = load_state_dict(shapes)
    enc = base.model.visual
    original = {k: v.clone() for k, v in enc.state_dict().items()}
    enc.load_state_dict(sd)
    for k, v in enc.state_dict().items():
        assert torch.equal(v, sd[k])
    enc.load_state_dict(original)


def test_resume_from_last_checkpoint(two_models, tmp_path, session_cache):
    (shapes, _), _ = two_models
    ckpt = shapes.parent / "checkpoints" / "last.ckpt"
    cli, _ = _fit("shapes", tmp_path, session_cache, ["--trainer.max_steps", "6", "--ckpt_path", str(ckpt)])
    assert cli.trainer.global_step == 6


def test_only_encoder_changes_and_text_tower_absent(two_models):
    _, cli = two_models
    names = [n for n, _ in cli.model.named_parameters()]
    assert names and all(n.startswith("classifier.encoder.") for n in names)


def test_merge_cli_task_arithmetic_against_reference(two_models, base, tmp_path, session_cache, capsys):
    (shapes, colours), _ = two_models
    out = tmp_path / "merge"
    rc = merge.main(["--models", str(shapes), str(colours), "--coefficients", "0.3", "0.6", "--out_dir", str(out),
                     "--cache_dir", session_cache, "--synthetic_test_size", "40"])
    assert rc == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == str(out / "results.json")
    res = json.loads((out / "results.json").read_text())
    assert {"config", "code_version", "rows"} <= res.keys()
    merges = [r["merge"] for r in res["rows"]]
    assert merges == ["individual", "zero-shot", "task_arithmetic", "task_arithmetic"]
    for r in res["rows"]:
        assert {"merge", "coefficient", "attack", "defense", "clean_acc", "mean_clean_acc", "normalized_acc", "asr"} <= r.keys()
        assert set(r["clean_acc"]) == {"shapes", "colours"}
        assert all(0 <= v <= 1 for v in r["clean_acc"].values())
        assert math.isclose(r["mean_clean_acc"], sum(r["clean_acc"].values()) / 2)
        assert r["attack"] is None and r["defense"] == "none" and r["asr"] is None  # a clean-accuracy row
    ind = res["rows"][0]["clean_acc"]
    ta = res["rows"][2]
    assert math.isclose(ta["normalized_acc"], (ta["clean_acc"]["shapes"] / ind["shapes"] + ta["clean_acc"]["colours"] / ind["colours"]) / 2)
    assert (out / "results.csv").read_text().splitlines()[0].startswith("merge,coefficient")

    # --export writes exactly θ_pre + λ Σ τ (reference computed here)
    exp = tmp_path / "merged.safetensors"
    assert merge.main(["--models", str(shapes), str(colours), "--coefficients", "0.3", "--export", str(exp), "--evaluate", "false"]) == 0
    theta_pre = base.encoder_state_dict()
    taus = [task_vector(load_state_dict(p), theta_pre) for p in (shapes, colours)]
    got = load_state_dict(exp)
    for k, v in theta_pre.items():
        ref = v + 0.3 * (taus[0][k] + taus[1][k]) if v.is_floating_point() else v
        torch.testing.assert_close(got[k], ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(got, task_arithmetic(theta_pre, taus, coefficient=0.3))
    assert load_metadata(exp)["method"] == "task_arithmetic"


def test_merge_refuses_model_from_another_base(two_models, tmp_path):
    (shapes, _), _ = two_models
    bad = tmp_path / "other.safetensors"
    from merging.io import save_state_dict

    meta = load_metadata(shapes)
    meta["base_model"]["base_id"] = "ViT-B-32@openai"
    save_state_dict(bad, load_state_dict(shapes), meta)
    rc = merge.main(["--models", str(bad), "--evaluate", "false", "--coefficients", "0.3", "--export", str(tmp_path / "m.safetensors")])
    assert rc == 2
    assert not (tmp_path / "m.safetensors").exists()


def _write_imagefolder(root: Path, classes=("a", "b", "c"), n=6):
    for split in ("train", "test"):
        for i, c in enumerate(classes):
            d = root / split / f"{i:03d}_{c}"
            d.mkdir(parents=True)
            for j in range(n):
                Image.new("RGB", (30, 20), (40 * i, 10 * j, 100)).save(d / f"{j}.png")


def test_datamodule_reads_local_imagefolder_with_clip_preprocessing(tmp_path):
    from datamodules.tasks import TaskSpec, register_task

    register_task(TaskSpec(name="tiny_folder", hub_id=None, hub_config=None, train_split="train", test_split="test",
                           classnames=("a", "b", "c"), templates=("a photo of {}.",)), overwrite=True)
    _write_imagefolder(tmp_path / "data")
    dm = TaskDataModule(task="tiny_folder", data_dir=str(tmp_path / "data"), batch_size=4, eval_batch_size=8)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 24, 24) and y.dtype == torch.long
    assert len(dm.splits["train"]) + len(dm.splits["val"]) == 18 and len(dm.splits["val"]) == 1
    assert len(dm.splits["test"]) == 18


def test_datamodule_reads_local_hub_format(tmp_path):
    import datasets

    from datamodules.tasks import TaskSpec, register_task

    register_task(TaskSpec(name="tiny_hub", hub_id="someone/tiny", hub_config=None, train_split="train", test_split="test",
                           classnames=("a", "b"), templates=("a photo of {}.",)), overwrite=True)
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    (tmp_path / "hub" / "data").mkdir(parents=True)
    for split, n in (("train", 20), ("test", 6)):
        ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8), (i * 10, 0, 0)) for i in range(n)],
                                         "label": [i % 2 for i in range(n)]}, features=feats)
        ds.to_parquet(str(tmp_path / "hub" / "data" / f"{split}-00000-of-00001.parquet"))
    dm = TaskDataModule(task="tiny_hub", data_dir=str(tmp_path / "hub"), batch_size=2)
    dm.setup()
    assert (len(dm.splits["train"]), len(dm.splits["val"]), len(dm.splits["test"])) == (18, 2, 6)


def test_merge_plan_every_method_with_val_selection(two_models, tmp_path, session_cache):
    (shapes, colours), _ = two_models
    plan = [
        {"name": "ta[val]", "method": "task_arithmetic", "coefficients": [0.2, 0.6], "select_on": "val"},
        {"name": "ties_mean", "method": "ties", "coefficients": [1.0], "hparams": {"k": 20.0, "disjoint": "mean"}},
        {"name": "weight_average", "method": "weight_average"},
        {"name": "regmean", "method": "regmean", "hparams": {"gram_batches": 1}},
        {"name": "ada", "method": "adamerging", "hparams": {"granularity": "task", "steps": 2}},
    ]
    out = tmp_path / "plan"
    args = ["--models", str(shapes), str(colours), "--out_dir", str(out), "--cache_dir", session_cache,
            "--synthetic_test_size", "40", "--val_max_examples", "20", "--gram_batch_size", "8", "--plan", json.dumps(plan)]
    assert merge.main(args) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["merge"] for r in rows] == ["individual", "zero-shot", "ta[val]", "ties_mean", "weight_average", "regmean", "ada"]
    sel = rows[2]["selection"]
    assert sel["split"] == "val" and set(map(float, sel["scores"])) == {0.2, 0.6}  # JSON keys are strings
    assert rows[2]["coefficient"] == sel["chosen"]
    assert rows[3]["hyperparameters"]["disjoint"] == "mean"
    lam = rows[6]["hyperparameters"]["learned_coefficients"]
    assert len(lam) == 2 and all(0 <= v <= 1 for v in lam)


def test_streaming_engine_gives_the_same_merge(two_models, tmp_path, session_cache):
    (shapes, colours), _ = two_models
    outs = {}
    for engine in ("memory", "streaming"):
        p = tmp_path / f"{engine}.safetensors"
        assert merge.main(["--models", str(shapes), str(colours), "--method", "ties", "--coefficients", "0.4", "--engine", engine,
                           "--cache_dir", session_cache, "--export", str(p), "--evaluate", "false"]) == 0
        outs[engine] = load_state_dict(p)
    for k in outs["memory"]:
        torch.testing.assert_close(outs["memory"][k], outs["streaming"][k], rtol=0, atol=1e-6)


def test_merge_callback_logs_merged_accuracy_during_fit(two_models, tmp_path, session_cache):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (_, colours), _ = two_models
    cli, root = _fit("shapes", tmp_path, session_cache, ["--trainer.callbacks+", "callbacks.merge_eval.MergeEvaluate",
                                                         "--trainer.callbacks.pool", json.dumps([str(colours)]),
                                                         "--trainer.callbacks.every_n_steps", "2",
                                                         "--trainer.callbacks.max_examples", "20",
                                                         "--trainer.callbacks.cache_dir", session_cache])
    from callbacks.merge_eval import MergeEvaluate

    merge_cb = next(c for c in cli.trainer.callbacks if isinstance(c, MergeEvaluate))
    assert [h["step"] for h in merge_cb.history] == [2, 4]
    ea = EventAccumulator(str(next(root.rglob("events.out.tfevents*"))))
    ea.Reload()
    tags = ea.Tags()["scalars"]
    for t in ("merge/task_arithmetic/λ=0.3/acc/shapes", "merge/task_arithmetic/λ=0.3/acc/colours", "merge/task_arithmetic/λ=0.3/mean_acc"):
        assert t in tags
    vals = [e.value for e in ea.Scalars("merge/task_arithmetic/λ=0.3/mean_acc")]
    assert len(vals) == 2 and all(0 <= v <= 1 for v in vals)
    assert vals[-1] == pytest.approx(merge_cb.history[-1]["merge/task_arithmetic/λ=0.3/mean_acc"])
