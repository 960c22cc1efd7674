"""The paper specs (configs/experiments/paper_*.yaml): they parse, a missing data set stops them before any training
with one line, the reference recipe's epochs, and the BadMerging spec run end to end on CPU.

The end-to-end test runs ``pipeline.py --spec`` on the BadMerging spec as shipped (its trainings, stage configs,
attacks, merge plan and scenarios), reduced only where a CPU test must be:

- base: ViT-B/32 (open_clip's architecture, 224 px input) with random-init weights in a local .safetensors, no download;
- data: every task of the spec becomes a task-file task ``tiny_<task>`` (same prompt templates, its first 2 class
  names) over a generated imagefolder of 2 classes × 6 train / 2 test images: heads of 2 classes instead of 100/196/…;
- budget: the spec's own ``--quick`` section (2 steps per stage, small merge budgets) plus CPU settings (accelerator
  cpu, batch 2, no loader workers), the TA curve at λ 0.3 only, a shadow head of the target + 2 names,
  ``--reference_epochs false`` (the tiny tasks have no reference epochs; the epochs are tested on their own below),
  no ModelCheckpoint (disk: ≈ 1 GB per training), and RegMean in the clean scenario only (≈ 2 min per merge here).

Everything else (stage 1 on- and off-task, the four injections, the six clean fine-tunes, TA / TIES / RegMean /
AdaMerging, attack probes, the matrix and figures) runs as on a GPU node. Measured on 2 busy CPU cores: 7–10 min
(≈ 25 s per training, each writing 351 MB exports; ≈ 3 min for the clean scenario's merges), ≈ 10 GB of disk (removed
after) and ≈ 20 GB peak memory (the evaluations run in the test's process, one after another).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from datamodules.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
BADMERGING = "configs/experiments/paper_badmerging_vitb32.yaml"
SPECS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs/experiments").glob("paper_*.yaml"))


@pytest.fixture(autouse=True)
def _registry(monkeypatch, task_registry_restored):
    """Task files loaded here (ImageNet-100, the tiny tasks) leave the registry and the environment as they were."""
    monkeypatch.chdir(ROOT)  # the specs name their config files relative to the repository


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """No network and an empty hub cache: a hub task's data is missing."""
    import datasets
    import huggingface_hub.constants as hub_constants

    for var, value in (("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1"), ("HF_HOME", str(tmp_path / "hf")),
                       ("HF_DATASETS_CACHE", str(tmp_path / "hf/datasets")), ("HF_HUB_CACHE", str(tmp_path / "hf/hub"))):
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf/datasets", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf/hub"), raising=False)


def _imagefolder(root: Path, classes: int = 2, train: int = 6, test: int = 2, test_split: str = "test",
                 seed: int = 0) -> Path:
    """``root/{train,<test_split>}/<000_c>/<i>.png``: 32 px images, one colour per class plus noise."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), (test_split, test)):
        for c in range(classes):
            folder = root / split / f"{c:03d}_c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                colour = np.array([200 * (c % 2), 120, 200 * (1 - c % 2)], dtype=np.float64)
                pixels = np.clip(colour + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def _imagenet100(monkeypatch, tmp_path) -> None:
    """IMAGENET100_DIR: a folder with the layout configs/tasks/imagenet100.yaml reads (train / val)."""
    monkeypatch.setenv("IMAGENET100_DIR", str(_imagefolder(tmp_path / "imagenet100", test_split="val")))


# -- the specs parse -----------------------------------------------------------------------------------------------
def test_every_paper_spec_parses_and_names_the_paper_setting(monkeypatch, tmp_path):
    from experiments.spec import load_spec

    _imagenet100(monkeypatch, tmp_path)
    assert {"configs/experiments/paper_badmerging_vitb32.yaml", "configs/experiments/paper_bv_vitb32.yaml",
            "configs/experiments/paper_bv_vitl14.yaml"} <= set(SPECS)
    for path in SPECS:
        spec = load_spec(path)
        trainings = spec.all_trainings()
        assert "cifar100" in spec.tasks and spec.base.pretrained == "openai", path
        assert spec.base.model_name in ("ViT-B-32", "ViT-L-14"), path
        for t in trainings.values():  # every stage trains in fp32 with the train transform
            text = " ".join(Path(c).read_text() for c in t.configs) + " " + " ".join(t.overrides)
            assert "open_clip" in text and ("32-true" in text), (path, t.name)
            if spec.base.model_name == "ViT-L-14":
                assert "ViT-L-14" in text, (path, t.name)
    spec = load_spec(BADMERGING)
    assert spec.tasks == ["cifar100", "gtsrb", "eurosat", "stanford_cars", "sun397", "oxford_pets"]
    assert [a.name for a in spec.attacks] == ["badnets", "ut_only", "badmerging_ontask", "badmerging_offtask"]
    trainings = spec.all_trainings()
    assert trainings["trigger_offtask"].task == "stanford_cars" and trainings["trigger_ontask"].task == "cifar100"
    methods = {e["method"] for e in yaml.safe_load(Path("configs/merge/vitb32_paper.yaml").read_text())["plan"]}
    assert methods == {"ties", "regmean", "adamerging"}  # + the scenarios' Task Arithmetic


def test_the_specs_base_and_local_folders_reach_every_training(tmp_path):
    """A training runs on the spec's base and reads its task's evaluation.data_dirs folder (first, so a training's own
    overrides still win); the embedded default adds no flag (its cache keys stay as they were)."""
    from experiments.graph import RunOptions, build_graph, training_overrides
    from experiments.spec import load_spec

    spec = load_spec(BADMERGING)
    spec.evaluation.data_dirs = {"cifar100": str(tmp_path / "cifar100")}
    options = RunOptions(out_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))
    trainings = spec.all_trainings()
    for name, t in trainings.items():
        flags = training_overrides(spec, t, options)
        assert flags[:4] == ["--model.init_args.model_name", "ViT-B-32", "--model.init_args.pretrained", "openai"], name
        assert ("--data.data_dir" in flags) == (t.task == "cifar100"), name
        if t.task == "cifar100":
            assert flags[flags.index("--data.data_dir") + 1] == str(tmp_path / "cifar100")
    keys = {n.id: n.key for n in build_graph(spec, options).values()}
    spec.evaluation.data_dirs = {}
    assert keys != {n.id: n.key for n in build_graph(spec, options).values()}  # the folder is in the key
    embedded = load_spec("configs/experiments/embedded.yaml")
    for t in embedded.all_trainings().values():
        assert not {"--model.init_args.model_name", "--data.data_dir"} & set(training_overrides(embedded, t, options))


# -- the reference recipe's epochs -------------------------------------------------------------------------------------
def test_reference_epochs_set_max_epochs_from_the_table_and_refuse_a_task_without_one(one_error_line):
    import train
    from experiments.training import REFERENCE_EPOCHS, TrainInputError, _apply_reference_epochs

    config = {"reference_epochs": True, "data": {"task": "cifar100"}, "trainer": {"max_epochs": None, "max_steps": -1}}
    _apply_reference_epochs(config)
    assert config["trainer"] == {"max_epochs": 5, "max_steps": -1}  # BadMerging's table: 5 epochs of CIFAR-100
    assert REFERENCE_EPOCHS["stanford_cars"] == 35 and REFERENCE_EPOCHS["sun397"] == 14
    off = {"reference_epochs": False, "data": {"task": "cifar100"}, "trainer": {"max_epochs": 3}}
    _apply_reference_epochs(off)
    assert off["trainer"]["max_epochs"] == 3
    with pytest.raises(TrainInputError, match="task shapes has no epoch count"):
        _apply_reference_epochs({"reference_epochs": True, "data": {"task": "shapes"}, "trainer": {}})
    # through train.py: one line before any data or model is built
    assert train.cli_main(["fit", "--config", "configs/experiment/embedded_finetune.yaml", "--reference_epochs", "true",
                           "--trainer.accelerator", "cpu"]) == 2
    line = one_error_line("train.py")
    assert "--reference_epochs true: task shapes has no epoch count in the reference recipe" in line
    assert "--reference_epochs false with --trainer.max_steps" in line


# -- a missing data set stops the run before any training --------------------------------------------------------------
def test_a_missing_hub_dataset_stops_the_paper_spec_before_any_training(tmp_path, offline_hub, one_error_line):
    import pipeline

    out, cache = tmp_path / "out", tmp_path / "cache"
    assert pipeline.main(["--spec", BADMERGING, "--out_dir", str(out), "--cache_dir", str(cache)]) == 2
    line = one_error_line("pipeline.py")
    assert "task 'cifar100': hub dataset uoft-cs/cifar100 is not available" in line, line
    assert "run once with network access" in line
    assert "its folder in the spec's evaluation.data_dirs ({cifar100: <dir>})" in line
    assert "<dir>/{train,test}/<class>/<image>" in line
    assert not out.exists() and not (cache / "artifacts").exists()  # nothing trained, no output


def test_a_missing_or_incomplete_local_folder_is_named_with_its_layout(tmp_path, offline_hub, one_error_line):
    import pipeline

    spec = yaml.safe_load(Path(BADMERGING).read_text())
    folders = {t: str(_imagefolder(tmp_path / t)) for t in spec["tasks"]}
    folders["sun397"] = str(tmp_path / "nowhere")
    spec["evaluation"]["data_dirs"] = folders
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    argv = ["--spec", str(tmp_path / "spec.yaml"), "--out_dir", str(out), "--cache_dir", str(tmp_path / "cache")]
    assert pipeline.main(argv) == 2
    line = one_error_line("pipeline.py")
    assert line.startswith(f"pipeline.py: error: evaluation.data_dirs sun397: data directory '{tmp_path / 'nowhere'}'"), line
    shutil.rmtree(tmp_path / "oxford_pets" / "test")  # a folder without its test split
    folders["sun397"] = str(_imagefolder(tmp_path / "sun397"))
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert pipeline.main(argv) == 2
    line = one_error_line("pipeline.py")
    assert f"evaluation.data_dirs oxford_pets: no 'test' split of task 'oxford_pets' in '{tmp_path / 'oxford_pets'}'" in line
    assert f"{tmp_path / 'oxford_pets'}/{{train,test}}/<class>/<image>" in line
    assert not out.exists() and not (tmp_path / "cache" / "artifacts").exists()


def test_the_bv_specs_without_imagenet100_stop_on_its_folder(monkeypatch, one_error_line, tmp_path):
    import pipeline

    monkeypatch.delenv("IMAGENET100_DIR", raising=False)
    assert pipeline.main(["--spec", "configs/experiments/paper_bv_vitb32.yaml", "--out_dir", str(tmp_path / "o")]) == 2
    assert "IMAGENET100_DIR" in one_error_line("pipeline.py")


# -- the whole path on CPU ---------------------------------------------------------------------------------------------
def _random_vitb32(path: Path) -> Path:
    """Random-init ViT-B/32 (open_clip's init, seed 0) as float16 safetensors: the paper's architecture, no download."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _tiny_spec(tmp_path: Path, weights: Path) -> Path:
    """The BadMerging spec on tiny task-file copies of its tasks (see the module docstring); its file's path."""
    spec = yaml.safe_load(Path(BADMERGING).read_text())
    rename = {t: f"tiny_{t}" for t in spec["tasks"]}
    entries = []
    for task, name in rename.items():
        real = get_task(task)
        entries.append({"name": name, "classnames": list(real.classnames[:2]), "templates": task,
                        "data_dir": str(_imagefolder(tmp_path / "data" / task, seed=len(entries)))})
    (tmp_path / "tiny_tasks.yaml").write_text(yaml.safe_dump({"tasks": entries}))
    spec["tasks_files"] = [str(tmp_path / "tiny_tasks.yaml")]
    spec["tasks"] = [rename[t] for t in spec["tasks"]]
    spec["base"]["pretrained"] = str(weights)
    for t in spec["trainings"]:
        t["task"] = rename[t["task"]]
        if t["name"] == "trigger_offtask":
            t["overrides"] = [*t.get("overrides", []), "--model.init_args.num_shadow_classes", "2"]
    # RegMean (≈ 2 min per merge on 2 CPU cores: the Gram solves of ViT-B/32's linear layers) in the clean scenario
    # only; the attack scenarios merge with TA, TIES and AdaMerging (the same evaluation path for every method)
    no_regmean = [e for e in yaml.safe_load(Path(PLAN).read_text())["plan"] if e["method"] != "regmean"]
    (tmp_path / "plan_attacked.yaml").write_text(yaml.safe_dump({"plan": no_regmean}))
    attacked = next(s for s in spec["scenarios"] if s["models"] == "attack")
    attacked["plan_files"] = [str(tmp_path / "plan_attacked.yaml") if f == PLAN else f for f in attacked["plan_files"]]
    # no ModelCheckpoint: its last.ckpt (weights, θ_pre and AdamW states, ≈ 1–1.4 GB per training) is not part of
    # what this test checks (resuming is tests/test_engine.py's and tests/test_resume.py's)
    for kind, callbacks in (("encoder", ENCODER_CALLBACKS), ("trigger", TRIGGER_CALLBACKS)):
        spec["quick"]["overrides"][kind] += ["--trainer.callbacks", json.dumps(callbacks),
                                             "--trainer.enable_checkpointing", "false"]
    spec["evaluation"].update(batch_size=8)
    spec["quick"]["evaluation"].update(val_max_examples=4, gram_batch_size=2)
    path = tmp_path / "paper_badmerging_tiny.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


PLAN = "configs/merge/vitb32_paper.yaml"
ENCODER_CALLBACKS = [{"class_path": "callbacks.export.ExportEncoder"},
                     {"class_path": "callbacks.tensorboard.TensorBoardHparamsAndImages"},
                     {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "step"}}]
TRIGGER_CALLBACKS = ENCODER_CALLBACKS[1:]
CPU = ["--trainer.accelerator", "cpu", "--data.batch_size", "2", "--data.eval_batch_size", "8",
       "--data.num_workers", "0", "--reference_epochs", "false"]


@pytest.mark.slow
def test_the_badmerging_paper_spec_runs_end_to_end_on_cpu(tmp_path, capsys):
    import pipeline

    weights = _random_vitb32(tmp_path / "vitb32_random.safetensors")
    spec_path = _tiny_spec(tmp_path, weights)  # the spec's base (evaluation) and every training's (its configs' tag)
    out, cache = tmp_path / "out", tmp_path / "cache"
    t0 = time.time()
    try:
        assert pipeline.main(["--spec", str(spec_path), "--quick", "--coefficients", "0.3", "--jobs", "1",
                              "--out_dir", str(out), "--cache_dir", str(cache), "--train_overrides",
                              json.dumps([*CPU, "--model.init_args.pretrained", str(weights)])]) == 0
        seconds = time.time() - t0
        printed = capsys.readouterr().out
        assert printed.strip().splitlines()[-1] == str(out / "results.json")
        results = json.loads((out / "results.json").read_text())
        timing = results["config"]["timing"]
        trained = {nid for nid, t in timing.items() if t["kind"] == "train"}
        assert trained == {f"train:{n}" for n in ("tiny_cifar100", "tiny_gtsrb", "tiny_eurosat", "tiny_stanford_cars",
                                                   "tiny_sun397", "tiny_oxford_pets", "trigger_ontask", "trigger_offtask",
                                                   "attack_badnets", "attack_ut_only", "attack_badmerging_ontask",
                                                   "attack_badmerging_offtask")}
        assert not any(t["cached"] for t in timing.values())
        rows = results["rows"]
        methods = {r["method"] for r in rows if r.get("method")}
        assert {"task_arithmetic", "ties", "regmean", "adamerging"} <= methods, methods
        assert {r.get("method") for r in rows if r["scenario"] == "clean"} >= {"ties", "regmean", "adamerging"}
        for attack in ("badnets", "ut_only", "badmerging_ontask", "badmerging_offtask"):
            attacked = [r for r in rows if r["scenario"] == attack and isinstance(r.get("attack"), dict)
                        and r["attack"].get("in_merge")]
            assert {r.get("method") for r in attacked} >= {"task_arithmetic", "ties", "adamerging"}, attack
            assert all(0.0 <= r["asr"] <= 1.0 and r["asr_total"] > 0 for r in attacked), attack
        offtask = next(r for r in rows if r["scenario"] == "badmerging_offtask" and isinstance(r.get("attack"), dict))
        assert offtask["attack"]["target_task"] == "tiny_stanford_cars"  # the off-task victim, not the attacker's task
        for name in ("summary.md", "matrix.csv", "asr_matrix.png", "delta_ca_matrix.png", "asr_ca_vs_coefficient.png",
                     "results.csv", "spec.yaml", "models/attack_badmerging_offtask.safetensors",
                     "models/trigger_offtask.safetensors"):
            assert (out / name).is_file(), name
        assert any((out / "tensorboard").rglob("events.out.tfevents.*"))
        matrix = (out / "matrix.csv").read_text()
        assert all(a in matrix for a in ("badnets", "ut_only", "badmerging_ontask", "badmerging_offtask"))
        print(f"paper spec end to end on CPU: {seconds:.0f} s")
    finally:
        shutil.rmtree(cache, ignore_errors=True)  # ≈ 10 GB of exports and checkpoints: never left for pytest's tmp
        shutil.rmtree(out, ignore_errors=True)


# -- the GPU stage benchmark runs (CPU smoke: a tiny model, a few steps) -------------------------------------------
def test_gpu_paper_stages_smoke_on_cpu(tmp_path):
    from benchmarks import gpu_paper_stages

    report = gpu_paper_stages.main(["--smoke", "--cpu", "--out", str(tmp_path)])
    stages = {row["stage"] for row in report["stages"]}
    assert stages == {"finetune", "injection", "stage1_step", "pgd_step", "evaluate", "adamerging_step", "data"}
    assert all((row.get("images/s") or row.get("steps/s")) > 0 for row in report["stages"])
    assert report["ratio"]["precision"] == "bf16-mixed" and report["ratio"]["lightning_over_plain_time"] > 0
    assert report["lightning_profile"] and all(p["seconds"] >= 0 for p in report["lightning_profile"])
    work = report["workload"]  # the paper spec's graph: 6 fine-tunes, 4 injections, 2 triggers
    from experiments.training import REFERENCE_EPOCHS

    expected = sum(REFERENCE_EPOCHS[t] * ((n - min(n // 10, 5000)) // 128) for t, n in gpu_paper_stages.TRAIN_SIZES.items()
                   if t in ("cifar100", "gtsrb", "eurosat", "stanford_cars", "sun397", "oxford_pets"))
    assert work["train_steps"] == expected and work["injection_steps"] == 4 * 5 * (45000 // 128)
    assert work["adamerging_steps"] == 5 * 500 and work["eval_images"] > 0
    hours = report["gpu_hours"]
    assert 0 < hours["hours_stage1_min"] <= hours["hours"] <= hours["hours_stage1_max"]
    assert "SMOKE" in (tmp_path / "gpu_paper_stages_smoke.md").read_text()
    assert json.loads((tmp_path / "gpu_paper_stages_smoke.json").read_text())["smoke"] is True
