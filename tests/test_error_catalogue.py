"""The error catalogue (ERRORS.md): every bad input of train.py and merge.py stops with exit status 2 and one
line ``<prog>: error: ...`` that names the input and the fix, no traceback, and no partial output files.

Each case runs the real entry point in-process (``merge.main`` / ``train.cli_main``, which ``python merge.py`` /
``python train.py`` call), checks the message against the catalogue, and checks that nothing was left behind.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

import merge
import train
from evaluation.merge_methods import REGISTRY as MERGE_REGISTRY
from merging.io import MergeInputError, load_metadata, save_state_dict

CONFIG = "configs/experiment/embedded_finetune.yaml"


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


# `models` (two exported encoders, shapes and digits, with full metadata) and `one_error_line` are in conftest.py


def _variant(models, tmp_path, change, name="bad.safetensors", meta_change=None) -> Path:
    """A copy of the first model with its state dict (and metadata) changed."""
    from merging.io import load_state_dict

    sd = load_state_dict(models[0])
    change(sd)
    meta = load_metadata(models[0])
    if meta_change:
        meta_change(meta)
    path = tmp_path / name
    save_state_dict(path, sd, meta)
    return path


KEY = "transformer.resblocks.0.mlp.c_fc.weight"


# case -> (argv builder (tmp_path, models) -> argv, regex the one error line must match)
MERGE_CASES = {
    "missing file": (
        lambda t, m: ["--models", str(m[0]), str(t / "nope.safetensors")],
        r"--models: .*nope\.safetensors does not exist; pass exported encoders \(\.safetensors\)"),
    "truncated safetensors": (
        lambda t, m: ["--models", str(m[0]), _truncated(t, m)],
        r"truncated\.safetensors: truncated: its header describes \d+ bytes, the file has \d+; copy or re-export it again"),
    "corrupt safetensors (garbage bytes)": (
        lambda t, m: ["--models", str(m[0]), _garbage(t)],
        r"garbage\.safetensors: .*(not a valid safetensors file|corrupt|truncated).*re-export it"),
    "pickle checkpoint": (
        lambda t, m: ["--models", str(m[0]), _pickled(t)],
        r"evil\.safetensors: looks like a pickle / torch\.save checkpoint, which is refused \(unpickling runs code\); "
        r"convert it to safetensors with trusted code"),
    "two models on one task": (
        lambda t, m: ["--models", str(m[0]), str(_variant(m, t, lambda s: s[KEY].add_(0.01)))],
        r"shapes\.safetensors and .*bad\.safetensors are both fine-tuned on task shapes; a merge takes one model per "
        r"task: leave one of them out"),
    "wrong base model": (
        lambda t, m: ["--models", str(m[0]), str(_variant(m, t, lambda s: None, meta_change=lambda d: d["base_model"].update(base_id="ViT-B-32@openai")))],
        r"bad\.safetensors was fine-tuned from ViT-B-32@openai, not from the base badmerging-tiny@sha256:[0-9a-f]+; "
        r"pass the matching --model_name/--pretrained, or leave this model out"),
    "shape mismatch": (
        lambda t, m: ["--models", str(m[0]), str(_variant(m, t, lambda s: s.update({KEY: s[KEY][:, :-1].contiguous()})))],
        rf"bad\.safetensors: key '{re.escape(KEY)}' has shape \(\d+, \d+\), pre-trained has \(\d+, \d+\); wrong architecture"),
    "dtype mismatch": (
        lambda t, m: ["--models", str(m[0]), str(_variant(m, t, lambda s: s.update({KEY: s[KEY].half()})))],
        rf"bad\.safetensors: key '{re.escape(KEY)}' is torch\.float16, pre-trained is torch\.float32; export all models in one dtype"),
    "missing key": (
        lambda t, m: ["--models", str(m[0]), str(_variant(m, t, lambda s: s.pop(KEY)))],
        rf"bad\.safetensors: lacks key '{re.escape(KEY)}' of the pre-trained model .*was it fine-tuned from this base\?"),
    "NaN weights": (
        lambda t, m: ["--models", str(m[0]), str(_variant(m, t, lambda s: s[KEY].view(-1).__setitem__(7, float("nan"))))],
        rf"bad\.safetensors: key '{re.escape(KEY)}' contains NaN or inf; the model diverged, re-train it or leave it out"),
    "duplicate input (same file twice)": (
        lambda t, m: ["--models", str(m[0]), str(m[1]), str(m[0])],
        r"--models: .*shapes\.safetensors is given twice \(also as .*shapes\.safetensors\); list each model once"),
    "duplicate input (identical copy)": (
        lambda t, m: ["--models", str(m[0]), str(_variant(m, t, lambda s: None, name="copy.safetensors"))],
        r"copy\.safetensors: model #1 has exactly the weights of model #0 \(.*shapes\.safetensors\); each fine-tuned "
        r"model must appear once"),
    "unknown method": (  # every registered method, regmean and adamerging too: the list is the registry's
        lambda t, m: ["--models", *map(str, m), "--method", "fisher"],
        rf"unknown merge method 'fisher'; known: {re.escape(', '.join(MERGE_REGISTRY.names()))}; or a class path such "
        r"as my_module\.MyMethod$"),
    "DARE base that is no weight merge": (
        lambda t, m: ["--models", *map(str, m), "--method", "dare", "--hparams", "{base: regmean}"],
        r"dare: base='regmean' must be one of task_arithmetic, ties \(the weight merge DARE's rescaled task vectors go "
        r"into\)"),
    "a string that is no device": (
        lambda t, m: ["--models", *map(str, m), "--device", "banana"],
        r"--device 'banana' is not a device; use cpu, cuda, cuda:N \(N < the GPU count\), mps or auto$"),
    "a GPU this machine lacks (cuda:9)": (  # no CUDA here, or fewer than 10 GPUs
        lambda t, m: ["--models", *map(str, m), "--device", "cuda:9"],
        r"--device cuda:9: (this machine has no usable CUDA GPU \(torch\.cuda\.is_available\(\) is False\); use --device "
        r"cpu \(or auto\)|no such GPU, this machine has \d (cuda:0 \.\. cuda:\d); pick one of them, or --device cuda)$"),
    "unknown task": (
        lambda t, m: ["--models", *map(str, m), "--tasks", "shapes", "sun398"],
        r"unknown task 'sun398'; known tasks: "),
    "k outside (0, 100] (k = 0)": (
        lambda t, m: ["--models", *map(str, m), "--method", "ties", "--hparams", "{k: 0}"],
        r"ties: k=0 must lie in \(0, 100\] \(percent of each task vector kept\); TIES uses 20"),
    "k outside (0, 100] (k = 150)": (
        lambda t, m: ["--models", *map(str, m), "--method", "ties", "--hparams", "{k: 150}"],
        r"ties: k=150 must lie in \(0, 100\]"),
    "negative coefficient where meaningless": (
        lambda t, m: ["--models", *map(str, m), "--method", "ties", "--coefficients", "-0.3"],
        r"ties: coefficient=-0\.3 is negative, which is meaningless for ties \(it flips the merged vector\); use a "
        r"coefficient > 0, or task_arithmetic with λ < 0 for negation"),
    "unknown hyperparameter": (
        lambda t, m: ["--models", *map(str, m), "--method", "ties", "--hparams", "{topk: 20}"],
        r"ties: got an unexpected keyword argument 'topk'; its hyperparameters are: k, coefficient, disjoint"),
    "bad hyperparameter value (DARE p = 1)": (
        lambda t, m: ["--models", *map(str, m), "--method", "dare", "--hparams", "{p: 1.0}"],
        r"dare: p=1\.0 must lie in \[0, 1\)"),
    "unwritable output directory": (
        lambda t, m: ["--models", *map(str, m), "--out_dir", str(_a_file(t) / "results")],
        r"--out_dir .*a_file/results cannot be created: .*a_file is a file, not a directory; pass another --out_dir"),
    "export path is a directory": (
        lambda t, m: ["--models", *map(str, m), "--evaluate", "false", "--export", str(t)],
        r"--export .* is a directory; pass a file path such as .*/model\.safetensors"),  # the shared check's example name
    "malformed YAML": (
        lambda t, m: ["--config", _yaml(t, "models: [a.safetensors\nmethod: ties\n")],
        r"--config .*bad\.yaml: malformed YAML at line \d+, column \d+ \(.*\); fix the file"),
    "unknown config key": (
        lambda t, m: ["--config", _yaml(t, f"models: [{m[0]}, {m[1]}]\nmethodd: ties\n")],
        r"unknown option or config key 'methodd'; fix its spelling or remove it \(merge\.py --help lists them\)"),
    "model without task metadata": (
        lambda t, m: ["--models", str(m[0]), _no_sidecar(t, m)],
        r"bare\.safetensors: no metadata names its task; pass --tasks in the same order as --models"),
    "bad numeric argument": (
        lambda t, m: ["--models", *map(str, m), "--batch_size", "0"],
        r"--batch_size=0 must be a positive integer"),
    "unknown defense": (
        lambda t, m: ["--models", str(m[0]), "--defense", "pruning"],
        r"--defense='pruning' is unknown; use one of none, ibvs"),
    "IBVS without the defender's pair": (
        lambda t, m: ["--models", str(m[0]), "--defense", "ibvs"],
        r"--defense ibvs needs --ibvs_clean: the defender's own clean fine-tune"),
    "negative IBVS alpha": (
        lambda t, m: ["--models", str(m[0]), "--defense", "ibvs", "--ibvs_clean", str(m[0]), "--ibvs_backdoored", str(m[1]),
                      "--ibvs_alphas", "-1"],
        r"--ibvs_alphas: α=-1\.0 must be a finite number ≥ 0 \(0 = no defense\)"),
    "missing inherent trigger file": (
        lambda t, m: ["--models", str(m[0]), "--probe_triggers", str(t / "nope_trigger.safetensors")],
        r"--probe_triggers: .*nope_trigger\.safetensors does not exist; pass a stage-1 trigger file"),
    "coefficient not finite in the weights' dtype (1e39 in float32)": (
        lambda t, m: ["--models", *map(str, m), "--coefficients", "1e39"],
        r"task_arithmetic: coefficient=1e\+39 is not finite in float32 \(\|value\| must be ≤ 3\.403e\+38 there\), the "
        r"dtype of the weights it scales; use a merge coefficient such as 0\.3"),
    "merged weights not finite (λ·τ overflows float32)": (
        lambda t, m: ["--models", _big_tau(t, m), str(m[1]), "--coefficients", "3e38"],
        rf"task_arithmetic at coefficient=3e\+38: the merged weights are not finite \(key '{re.escape(KEY)}' holds NaN or "
        r"inf: the arithmetic overflowed float32\); nothing was evaluated or exported: use a smaller coefficient"),
    "defended weights not finite (IBVS strength overflows)": (
        lambda t, m: ["--models", str(m[0]), "--defense", "ibvs", "--ibvs_clean", str(m[0]), "--ibvs_backdoored", _big_tau(t, m),
                      "--ibvs_alphas", "3e38", "--ibvs_select", "null", "--individual", "false", "--zero_shot", "false"],
        r"task_arithmetic at coefficient=0\.3 under ibvs strength 3e\+38: the merged weights are not finite \(key .* "
        r"use a smaller strength"),
    "weight too large for the forward pass (3e38)": (
        lambda t, m: ["--models", str(m[1]), str(_variant(m, t, lambda s: s[KEY].view(-1).__setitem__(3, 3e38)))],
        rf"bad\.safetensors: key '{re.escape(KEY)}' holds a weight of magnitude 3e\+38, above the bound 1\.13e\+04 "
        r"\(10000 × max\(largest \|θ_pre\| weight 1\.13, 1\)\) past which the forward pass overflows; the model "
        r"diverged or is no fine-tune of this base: re-train it or leave it out"),
}


def _big_tau(t: Path, m) -> str:
    """A copy of the first model with τ = +5 on KEY: λ = 3e38 (finite in float32) times it overflows."""
    return str(_variant(m, t, lambda s: s[KEY].add_(5.0), name="big_tau.safetensors"))


def _truncated(t: Path, m) -> str:
    data = Path(m[1]).read_bytes()
    path = t / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2])
    return str(path)


def _garbage(t: Path) -> str:
    path = t / "garbage.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\x00" * 64)
    return str(path)


class _CreatesFile:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickled(t: Path) -> str:
    path = t / "evil.safetensors"
    torch.save({"w": _CreatesFile(t / "pwned")}, path)
    return str(path)


def _a_file(t: Path) -> Path:
    path = t / "a_file"
    path.write_text("not a directory")
    return path


def _yaml(t: Path, text: str) -> str:
    path = t / "bad.yaml"
    path.write_text(text)
    return str(path)


def _no_sidecar(t: Path, m) -> str:
    from merging.io import load_state_dict

    path = t / "bare.safetensors"
    save_state_dict(path, {k: v + 1e-3 if v.is_floating_point() else v for k, v in load_state_dict(m[1]).items()})
    return str(path)


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_merge_error_catalogue(case, models, tmp_path, session_cache, one_error_line):
    build, pattern = MERGE_CASES[case]
    out = tmp_path / "out"
    args = build(tmp_path, models) + ["--cache_dir", session_cache]
    if "--out_dir" not in args:
        args += ["--out_dir", str(out)]
    if "--export" not in args:
        args += ["--export", str(tmp_path / "merged.safetensors")]
    before = _files_under(tmp_path)
    assert merge.main(args) == 2
    line = one_error_line("merge.py")
    print(f"CATALOGUE merge.py | {case} | {line}")  # shown with pytest -rP (ERRORS.md quotes these lines)
    assert re.search(pattern, line), (pattern, line)
    assert not out.exists()  # no partial outputs
    assert not (tmp_path / "merged.safetensors").exists()
    assert _files_under(tmp_path) == before
    assert not (tmp_path / "pwned").exists()


def test_merge_traceback_on_request(models, tmp_path, monkeypatch):
    monkeypatch.setenv("BADMERGING_TRACEBACK", "1")
    with pytest.raises(MergeInputError, match="does not exist"):
        merge.main(["--models", str(tmp_path / "nope.safetensors")])


def test_merge_failure_after_export_removes_partial_outputs(models, tmp_path, capsys, session_cache, one_error_line):
    """An error during evaluation (data without labels), after the merged weights were written: nothing stays."""
    data = tmp_path / "no_labels"
    ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8))] * 4, "caption": ["x"] * 4})
    datasets.DatasetDict(train=ds, test=ds).save_to_disk(str(data))
    out, export = tmp_path / "deep" / "out", tmp_path / "merged.safetensors"
    capsys.readouterr()
    rc = merge.main(["--models", *map(str, models), "--coefficients", "0.3", "--export", str(export), "--out_dir", str(out),
                     "--individual", "false", "--zero_shot", "false", "--eval_tasks", "shapes",
                     "--data_dirs", json.dumps({"shapes": str(data)}), "--cache_dir", session_cache])
    assert rc == 2
    line = one_error_line("merge.py")
    assert "no label column 'label'" in line and "rename it to 'label'" in line
    assert not export.exists() and not export.with_suffix(".json").exists()
    assert not (tmp_path / "deep").exists()


# ---------------------------------------------------------------------------------------------
# train.py
# ---------------------------------------------------------------------------------------------
def _train_args(root: Path, cache: str, *extra: str, configs=(CONFIG,)) -> list[str]:
    """A tiny fit of the embedded model writing under ``root``; ``extra`` may start with more ``--config`` files."""
    extra = list(extra)
    more = []
    while extra[:1] == ["--config"]:
        more += extra[:2]
        extra = extra[2:]
    return ["fit", *[x for c in configs for x in ("--config", c)], *more, "--model.init_args.cache_dir", cache,
            "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
            "--trainer.enable_progress_bar", "false", "--data.synthetic_train_size", "64",
            "--data.synthetic_test_size", "16", "--data.batch_size", "16", "--trainer.max_steps", "2", *extra]


def _saved(t: Path, name: str, columns: dict) -> str:
    path = t / name
    ds = datasets.Dataset.from_dict(columns)
    datasets.DatasetDict(train=ds, test=ds).save_to_disk(str(path))
    return str(path)


def _images(n: int):
    return [Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)) for i in range(n)]


def _empty(t: Path) -> str:
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    full = datasets.Dataset.from_dict({"image": _images(4), "label": [0, 1, 2, 3]}, features=feats)
    path = t / "empty"
    datasets.DatasetDict(train=full.select([]), test=full).save_to_disk(str(path))
    return str(path)


def _evil_ckpt(t: Path) -> str:
    path = t / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _CreatesFile(t / "pwned")}, path)
    return str(path)


def _truncated_ckpt(t: Path) -> str:
    path = t / "cut.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:300])
    return str(path)


INJECTION = ["--config", "configs/experiment/embedded_injection.yaml", "--config", "configs/attack/embedded_badnets.yaml"]

TRAIN_CASES = {
    "missing config file": (
        lambda t: ["fit", "--config", str(t / "nope.yaml")],
        r"--config .*nope\.yaml: file not found; check the path"),
    "malformed YAML": (
        lambda t: ["fit", "--config", _yaml(t, "trainer:\n  max_steps: [4\nmodel: {}\n")],
        r"--config .*bad\.yaml: malformed YAML at line \d+, column \d+ \(.*\); fix the file"),
    "unknown config key": (
        lambda t: ["--config", _yaml(t, "trainer:\n  max_stepz: 3\n")],
        r"unknown config key '.*max_stepz'; fix its spelling or remove it \(`train\.py fit --help` lists the keys\)"),
    "unknown task": (
        lambda t: ["--data.task", "sun398"],
        r"unknown task 'sun398'; known tasks: "),
    "dataset without label column": (
        lambda t: ["--data.task", "digits", "--data.data_dir", _saved(t, "nolabel", {"image": _images(4), "caption": ["a"] * 4})],
        r"split 'train' has no label column 'label' \(columns: image, caption\): rename it to 'label' or set TaskSpec\.label_column"),
    "dataset without image column": (
        lambda t: ["--data.task", "digits", "--data.data_dir", _saved(t, "noimage", {"pixels": [1, 2, 3, 4], "label": [0, 1, 2, 3]})],
        r"split 'train' has no image column 'image' \(columns: pixels, label\): rename it to 'image' or set TaskSpec\.image_column"),
    "empty dataset": (
        lambda t: ["--data.task", "digits", "--data.data_dir", _empty(t)],
        r"split 'train' is empty: add examples to it or point data_dir elsewhere"),
    "train split smaller than a batch": (
        lambda t: ["--data.task", "digits", "--data.data_dir", _saved(t, "tiny", {"image": _images(4), "label": [0, 1, 2, 3]})],
        r"task digits: the train split has 3 examples, fewer than one batch of 16 .*lower --data\.batch_size or add data"),
    "missing data directory": (
        lambda t: ["--data.task", "digits", "--data.data_dir", str(t / "nodata")],
        r"--data\.data_dir=.*nodata is not a directory; pass the task's local data folder"),
    "bad hyperparameter (lr <= 0)": (
        lambda t: ["--model.init_args.lr", "-0.001"],
        r"--model\.init_args\.lr=-0\.001 must be a finite number in \(0, ∞\)"),
    "bad hyperparameter (batch size 0)": (
        lambda t: ["--data.batch_size", "0"],
        r"--data\.batch_size=0 must be an integer >= 1"),
    "unwritable output directory": (
        lambda t: ["--trainer.default_root_dir", str(_a_file(t) / "runs")],
        r"--trainer\.default_root_dir=.*a_file/runs cannot be created: .*a_file is a file, not a directory"),
    "missing base weights": (
        lambda t: ["--model.init_args.pretrained", str(t / "nope.safetensors")],
        r"weights file .*nope\.safetensors does not exist; pass an existing weights file \(merge\.py --pretrained, train\.py --model\.init_args\.pretrained\)"),
    "pickled base weights": (
        lambda t: ["--model.init_args.pretrained", _pickled_pt(t)],
        r"weights file .*evil\.pt holds Python objects other than tensors; refused \(unpickling could run code\): "
        r"convert it to \.safetensors with trusted code"),
    "missing checkpoint": (
        lambda t: ["--ckpt_path", str(t / "nope.ckpt")],
        r"--ckpt_path .*nope\.ckpt: file not found; pass an existing \.ckpt or 'last'"),
    "pickled checkpoint": (
        lambda t: ["--ckpt_path", _evil_ckpt(t)],
        r"--ckpt_path .*evil\.ckpt holds Python objects other than tensors and plain containers; refused"),
    "truncated checkpoint": (
        lambda t: ["--ckpt_path", _truncated_ckpt(t)],
        r"--ckpt_path .*cut\.ckpt is not a readable checkpoint \(.*\); it may be truncated"),
    "patch larger than the image": (
        lambda t: [*INJECTION, "--model.init_args.trigger", "{kind: patch, size: 30}"],
        r"trigger size=30 exceeds the image size 24; use a size of at most 24"),
    "target class out of range": (
        lambda t: [*INJECTION, "--model.init_args.target_class", "10"],
        r"target_class=10 is not a class of task shapes"),
}


def _pickled_pt(t: Path) -> str:
    path = t / "evil.pt"
    torch.save({"state_dict": {"w": _CreatesFile(t / "pwned")}}, path)
    return str(path)


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_error_catalogue(case, tmp_path, session_cache, one_error_line):
    build, pattern = TRAIN_CASES[case]
    root = tmp_path / "runs"
    extra = build(tmp_path)
    args = extra if extra and extra[0] == "fit" else _train_args(root, session_cache, *extra)
    before = _files_under(tmp_path)
    assert train.cli_main(args) == 2
    line = one_error_line("train.py")
    print(f"CATALOGUE train.py | {case} | {line}")  # shown with pytest -rP (ERRORS.md quotes these lines)
    assert re.search(pattern, line), (pattern, line)
    assert not root.exists(), _files_under(root)  # no log directory, config.yaml, checkpoint or export
    assert _files_under(tmp_path) == before
    assert not (tmp_path / "pwned").exists()


def test_train_non_finite_loss_stops_with_one_line(tmp_path, session_cache, one_error_line):
    root = tmp_path / "runs"
    assert train.cli_main(_train_args(root, session_cache, "--model.init_args.lr", "1e30", "--model.init_args.warmup_steps", "0",
                                      "--trainer.max_steps", "6", "--trainer.gradient_clip_val", "null")) == 2
    line = one_error_line("train.py")
    assert re.search(r"non-finite training loss (nan|inf) at step [1-5]; lower model\.lr or check the data", line), line
    assert not list(root.rglob("encoder.safetensors"))  # nothing exported from a diverged run


def test_train_api_raises_typed_errors(tmp_path, session_cache, monkeypatch):
    from datamodules.tasks import UnknownTaskError

    with pytest.raises(UnknownTaskError):
        train.main(_train_args(tmp_path / "runs", session_cache, "--data.task", "sun398"))
    with pytest.raises(train.TrainInputError, match="unknown config key"):
        train.main(_train_args(tmp_path / "runs", session_cache, "--trainer.max_stepz", "3"))
    monkeypatch.setenv("BADMERGING_TRACEBACK", "1")
    with pytest.raises(train.TrainInputError, match="must be an integer >= 1"):
        train.cli_main(_train_args(tmp_path / "runs", session_cache, "--data.batch_size", "0"))


def test_catalogue_has_at_least_15_cases_each_documented():
    text = (Path(__file__).resolve().parents[1] / "ERRORS.md").read_text()
    assert len(MERGE_CASES) + len(TRAIN_CASES) >= 15
    for case in list(MERGE_CASES) + list(TRAIN_CASES):
        assert case in text, f"ERRORS.md lacks the case {case!r}"


# ---------------------------------------------------------------------------------------------
# sweep.py
# ---------------------------------------------------------------------------------------------
import yaml  # noqa: E402

import sweep  # noqa: E402


def _sweep_yaml(t: Path, change=None, text: str | None = None) -> str:
    """A valid tiny sweep config writing under ``t/sweep``, changed by ``change(cfg)`` (or given as raw text)."""
    cfg = {"out_dir": str(t / "sweep"), "tasks": ["shapes", "digits"],
           "grid": {"attacks": ["none", "badnets"], "methods": ["task_arithmetic", "ties_sum"], "coefficients": [0.3],
                    "defenses": ["none"], "seeds": [0]},
           "methods": {"ties_sum": {"method": "ties", "hparams": {"k": 20, "disjoint": "sum"}}},
           "defenses": {"none": []}}
    if change:
        change(cfg)
    path = t / "sweep.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(cfg))
    return str(path)


def _set(*keys, value):
    def change(cfg):
        node = cfg
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return change


# case -> (argv builder (tmp_path) -> argv, regex the one error line must match)
SWEEP_CASES = {
    "missing sweep config file": (
        lambda t: ["--config", str(t / "nope.yaml")],
        r"--config .*nope\.yaml: file not found; check the path \(configs/sweep/ holds the shipped ones\)"),
    "malformed sweep YAML": (
        lambda t: ["--config", _sweep_yaml(t, text="grid:\n  attacks: [none\n  methods: [ties]\n")],
        r"--config .*sweep\.yaml: malformed YAML at line \d+, column \d+ \(.*\); fix the file"),
    "unknown sweep config key": (
        lambda t: ["--config", _sweep_yaml(t, _set("grid", "methodz", value=["ties"]))],
        r"sweep\.yaml: unknown key 'methodz' under grid; fix its spelling or remove it \(known: attacks, methods, "
        r"coefficients, defenses, seeds\)"),
    "unknown attack": (
        lambda t: ["--config", _sweep_yaml(t, _set("grid", "attacks", value=["none", "badnetz"]))],
        r"sweep\.yaml: grid\.attacks: unknown attack 'badnetz'; choose from none, badnets, "),
    "unknown merge method in the grid": (
        lambda t: ["--config", _sweep_yaml(t, _set("grid", "methods", value=["fisher"]))],
        r"sweep\.yaml: grid\.methods: unknown merge method 'fisher'; use one of task_arithmetic, .* or a name defined "
        r"under methods:"),
    "unknown defense": (
        lambda t: ["--config", _sweep_yaml(t, _set("grid", "defenses", value=["none", "ibvs"]))],
        r"sweep\.yaml: grid\.defenses: unknown defense 'ibvs'; define it under defenses: as ibvs: \{defense: <a defense "
        r"of the spec: ibvs>, strengths: \[\.\.\.\]\}, or use one of none"),
    "bad defense setting": (
        lambda t: ["--config", _sweep_yaml(t, lambda c: (c["defenses"].update(shield={"defense": "ibvs", "shield": "on"}),
                                                          c["grid"]["defenses"].append("shield")))],
        r"sweep\.yaml: defenses\.shield: unknown key 'shield'; fix its spelling or remove it \(known: defense, method, "
        r"inputs, strengths, select, max_drop\)"),
    "non-finite coefficient": (
        lambda t: ["--config", _sweep_yaml(t, _set("grid", "coefficients", value=[0.3, float("nan")]))],
        r"sweep\.yaml: grid\.coefficients: nan is not finite; give finite merge coefficients"),
    "coefficient not finite in float32": (
        lambda t: ["--config", _sweep_yaml(t, _set("grid", "coefficients", value=[0.3, 1e39]))],
        r"sweep\.yaml: grid\.coefficients: 1e\+39 is not finite in float32 \(\|value\| must be ≤ 3\.403e\+38 there\); give "
        r"finite merge coefficients λ such as 0\.3"),
    "negative coefficient": (
        lambda t: ["--config", _sweep_yaml(t, _set("grid", "coefficients", value=[-0.3]))],
        r"sweep\.yaml: grid\.coefficients: -0\.3 is negative; give coefficients λ >= 0"),
    "bad method hyperparameter": (
        lambda t: ["--config", _sweep_yaml(t, _set("methods", "ties_sum", "hparams", "k", value=0))],
        r"sweep\.yaml: methods\.ties_sum: k=0 must lie in \(0, 100\]"),
    "empty grid axis": (
        lambda t: ["--config", _sweep_yaml(t, _set("grid", "attacks", value=[]))],
        r"sweep\.yaml: grid\.attacks is empty; list at least one value"),
    "unknown task in the sweep": (
        lambda t: ["--config", _sweep_yaml(t, _set("tasks", value=["shapes", "sun398"]))],
        r"sweep\.yaml: tasks: unknown task 'sun398'; known tasks: "),
    "attacks without the attacker task": (
        lambda t: ["--config", _sweep_yaml(t, _set("tasks", value=["digits", "textures"]))],
        r"sweep\.yaml: the attacks fine-tune shapes, which tasks lacks; add it to tasks or keep only 'none'"),
    "unwritable sweep output directory": (
        lambda t: ["--config", _sweep_yaml(t, _set("out_dir", value=str(_a_file(t) / "sweep")))],
        r"out_dir .*a_file/sweep cannot be created: .*a_file is a file, not a directory; set out_dir in the config "
        r"\(or pass --out_dir\)"),
    "array_index out of range": (
        lambda t: ["--config", _sweep_yaml(t), "--array_index", "2", "--array_count", "2"],
        r"--array_index=2 must lie in \[0, 2\) for --array_count=2; start the SLURM array at 0"),
}


@pytest.mark.parametrize("case", list(SWEEP_CASES))
def test_sweep_error_catalogue(case, tmp_path, one_error_line):
    build, pattern = SWEEP_CASES[case]
    args = build(tmp_path)
    before = _files_under(tmp_path)
    assert sweep.main(args) == 2
    line = one_error_line("sweep.py")
    print(f"CATALOGUE sweep.py | {case} | {line}")  # shown with pytest -rP (ERRORS.md quotes these lines)
    assert re.search(pattern, line), (pattern, line)
    assert not (tmp_path / "sweep").exists()  # no partial outputs
    assert _files_under(tmp_path) == before


def test_sweep_traceback_on_request(tmp_path, monkeypatch):
    monkeypatch.setenv("BADMERGING_TRACEBACK", "1")
    with pytest.raises(sweep.SweepError, match="unknown attack 'badnetz'"):
        sweep.main(["--config", _sweep_yaml(tmp_path, _set("grid", "attacks", value=["badnetz"]))])


def test_sweep_catalogue_documented():
    text = (Path(__file__).resolve().parents[1] / "ERRORS.md").read_text()
    for case in SWEEP_CASES:
        assert case in text, f"ERRORS.md lacks the sweep case {case!r}"


# ---------------------------------------------------------------------------------------------
# pipeline.py (and experiment specs)
# ---------------------------------------------------------------------------------------------
def _spec_yaml(t: Path, change) -> str:
    data = yaml.safe_load(Path("configs/experiments/embedded.yaml").read_text())
    change(data)
    path = t / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _typo_key(data):
    data["trainings"][0]["confgs"] = data["trainings"][0].pop("configs")


def _cycle(data):
    data["trainings"][0]["inputs"] = {"trigger_path": "attack_ut_only"}


def _out_under_a_file(t: Path) -> Path:
    (t / "a_file").write_text("x")
    return t / "a_file" / "out"


PIPELINE_CASES = {
    "misspelt flag": (lambda t: ["--methds", "ta"], r"unknown option or config key 'methds'; fix its spelling"),
    "`--jobs 0`": (lambda t: ["--jobs", "0"], r"--jobs=0 must be a positive integer"),
    "a task the spec lacks": (lambda t: ["--tasks", "shapes", "nosuch"], r"--tasks: \['nosuch'\] not in the spec's tasks"),
    "unknown attack": (lambda t: ["--attacks", "nosuch"], r"--attacks: unknown attack\(s\) \['nosuch'\]; choose from badnets"),
    "unknown defense": (lambda t: ["--defense", "banana"], r"--defense='banana'; use all, none or one of ibvs"),
    "attacks without the attacker task": (lambda t: ["--tasks", "digits", "colours"],
                                          r"the attacks fine-tune shapes: keep it in --tasks or pass --attacks none"),
    "missing spec file": (lambda t: ["--spec", str(t / "nope.yaml")], r"--spec .*nope\.yaml: file not found"),
    "spec with an unknown key": (lambda t: ["--spec", _spec_yaml(t, _typo_key)], r"--spec .*spec\.yaml: .*confgs"),
    "spec whose trainings form a cycle": (
        lambda t: ["--spec", _spec_yaml(t, _cycle)],
        r"trainings form a cycle trigger_ontask -> attack_ut_only -> trigger_ontask; one of them must not need the other"),
    "unwritable output folder": (lambda t: ["--out_dir", str(_out_under_a_file(t))],
                                 r"--out_dir .*a_file/out cannot be created: .*a_file is a file, not a directory"),
    "unknown executor": (lambda t: ["--executor", "pbs"], r"--executor='pbs'; use local or slurm"),
    "coefficient not finite in float32": (
        lambda t: ["--coefficients", "1e39"],
        r"spec: scenario clean: plan: task_arithmetic: coefficient=1e\+39 is not finite in float32"),
}


@pytest.mark.parametrize("case", list(PIPELINE_CASES))
def test_pipeline_error_catalogue(case, tmp_path, monkeypatch, one_error_line):
    import pipeline

    build, pattern = PIPELINE_CASES[case]
    args = build(tmp_path)
    if "--out_dir" not in args:
        args += ["--out_dir", str(tmp_path / "out")]
    args += ["--cache_dir", str(tmp_path / "cache")]
    before = _files_under(tmp_path)
    assert pipeline.main(args) == 2
    line = one_error_line("pipeline.py")
    print(f"CATALOGUE pipeline.py | {case} | {line}")
    assert re.search(pattern, line), (pattern, line)
    assert _files_under(tmp_path) == before and not (tmp_path / "cache").exists()  # nothing trained or written


def test_pipeline_catalogue_documented():
    text = (Path(__file__).resolve().parents[1] / "ERRORS.md").read_text()
    for case in PIPELINE_CASES:
        assert case in text, f"ERRORS.md lacks the pipeline case {case!r}"
