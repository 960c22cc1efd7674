"""Tasks of your own from a YAML task file (datamodules.task_files): validation in one line, class names from
folders read before any head is built, the embedded vocabulary's unknown words refused, the files reaching spawned
workers through BADMERGING_TASKS_FILES, and a file-only task trained, merged and evaluated by every entry point."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import task_files, tasks
from datamodules.task_files import TaskFileError, load_tasks_file
from datamodules.tasks import TASKS, TASKS_FILES_ENV, get_task

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "configs/tasks/example.yaml"
IMAGENET100 = ROOT / "configs/tasks/imagenet100.yaml"
CONFIG = "configs/experiment/embedded_finetune.yaml"
COLOURS = {"red": (220, 30, 30), "green": (40, 170, 60), "blue": (40, 70, 220)}
FIX = ("use words it knows (python -m modeling.tokenizer lists them) or a base model with open_clip's full tokenizer "
       "(e.g. ViT-B-32)")


@pytest.fixture(autouse=True)
def _registry(task_registry_restored):
    """Every test starts from the built-in tasks and no task files, and leaves them so."""


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _folder(root: Path, classes, splits=("train", "test"), n: int = 3) -> Path:
    """``<root>/<split>/<class>/<j>.png``: a block of the class's colour (or grey) at a random place on grey."""
    rng = np.random.default_rng(0)
    for split in splits:
        for name in classes:
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            colour = COLOURS.get(re.sub(r"^\d+_", "", name), (90, 90, 90))
            for j in range(n):
                img = np.full((32, 32, 3), 128, np.uint8)
                y, x = rng.integers(0, 16, size=2)
                img[y:y + 14, x:x + 14] = colour
                Image.fromarray(img).save(d / f"{j}.png")
    return root


def _blocks(tmp_path: Path, monkeypatch, n: int = 3) -> Path:
    """The shipped example task file, its BLOCKS_DIR pointing at a rendered folder of red/green/blue blocks."""
    data = _folder(tmp_path / "blocks", ["000_red", "001_green", "002_blue"], n=n)
    monkeypatch.setenv("BLOCKS_DIR", str(data))
    return EXAMPLE


def _error(path, *, contains: str = "") -> str:
    before = dict(TASKS)
    with pytest.raises(TaskFileError) as e:
        load_tasks_file(path)
    message = str(e.value)
    assert "\n" not in message and contains in message, message
    assert TASKS == before  # nothing registered by a refused file
    return message


# -- parsing and validation ------------------------------------------------------------------------------------
ONE = "tasks:\n  - name: fruit\n    classnames: [circle, square]\n    hub_id: someone/fruit\n"


@pytest.mark.parametrize("text,expected", [
    ("tasks: [\n", "malformed YAML at line 2, column 1 (expected the node content, but found '<stream end>'); "
                   "fix the file"),
    ("- name: fruit\n", "holds a list; write a mapping with a 'tasks' list (see configs/tasks/example.yaml)"),
    ("task: []\n", "has no 'tasks' key; write a mapping with a 'tasks' list (see configs/tasks/example.yaml)"),
    (ONE + "version: 2\n", "unknown top-level key 'version'; the file holds only 'tasks' (move it into a task or remove it)"),
    ("tasks: []\n", "tasks: [] is not a non-empty list; list one mapping per task (see configs/tasks/example.yaml)"),
    ("tasks: [fruit]\n", "tasks[0]: 'fruit' is not a mapping; write each task as name: ..., classnames: ..., templates: ..."),
    (ONE.replace("classnames", "classname"), "task 'fruit': unknown key 'classname'; did you mean 'classnames'? (keys: "
     "name, classnames, templates, data_dir, hub_id, hub_config, train_split, test_split, image_column, label_column)"),
    (ONE.replace("name: fruit", "name: 1fruit"), "task '1fruit': name: '1fruit' is not a task name; use letters, digits, "
     "'_' and '-', starting with a letter"),
    (ONE.replace("    classnames: [circle, square]\n", ""), "task 'fruit': classnames: missing; list them in label "
     "order ([cat, dog]) or write from_folders"),
    (ONE.replace("[circle, square]", "[circle, no]"), "task 'fruit': classnames[1]: False is not text (YAML reads "
     "yes/no/on/off/true/false/null as other types); quote it"),
    (ONE.replace("[circle, square]", "[circle, 1.5]"), "task 'fruit': classnames[1]: 1.5 is not a class name; give each "
     "class name as text"),
    (ONE.replace("[circle, square]", "[circle, Circle]"), "task 'fruit': classnames: 'circle' and 'Circle' (positions 0 "
     "and 1) name the same class; class names must be unique (case-insensitive)"),
    (ONE.replace("[circle, square]", "from_folders"), "task 'fruit': classnames: from_folders reads the class folders of "
     "data_dir, which this task does not have; add data_dir (<data_dir>/<split>/<class>/<image>) or list the class names"),
    (ONE + "    templates: [a photo of a thing.]\n", "task 'fruit': templates[0]: 'a photo of a thing.' must hold '{}' "
     "(the class name) exactly once and no other braces; e.g. 'a photo of a {}.'"),
    (ONE + "    templates: []\n", "task 'fruit': templates: [] is not a list of templates; give e.g. ['a photo of a {}.']"),
    (ONE + "    train_split: 3\n", "task 'fruit': train_split: 3 is not a non-empty string; give it as text, e.g. "
     "train_split: train"),
    (ONE.replace("someone/fruit", "'someone/ fruit'"), "task 'fruit': hub_id: 'someone/ fruit' has white space; give the "
     "hub id as owner/name"),
    (ONE + "    templates: ['a {0} of a {}.']\n", "task 'fruit': templates[0]: 'a {0} of a {}.' must hold '{}' (the class "
     "name) exactly once and no other braces; e.g. 'a photo of a {}.'"),
    (ONE + "    data_dir: .\n", "task 'fruit': gives both data_dir and hub_id; give exactly one source: data_dir (a "
     "local folder) or hub_id (a datasets hub id)"),
    (ONE.replace("    hub_id: someone/fruit\n", ""), "task 'fruit': gives neither data_dir nor hub_id; give exactly one "
     "source: data_dir (a local folder) or hub_id (a datasets hub id)"),
    (ONE.replace("fruit\n    classnames", "cifar10\n    classnames"), "task 'cifar10': name: 'cifar10' is already a "
     "built-in task; rename this task"),
    (ONE.replace("fruit\n    classnames", "Shapes\n    classnames"), "task 'Shapes': name: 'shapes' is already a "
     "built-in task; rename this task"),
    (ONE + ONE.replace("tasks:\n", ""), "task 'fruit': name: defined twice in this file ('fruit' and 'fruit'); give each "
     "task its own name"),
])
def test_bad_task_files_are_refused_in_one_line(tmp_path, text, expected):
    path = _write(tmp_path / "tasks.yaml", text)
    assert _error(path) == f"task file {path}: {expected}"


def test_bad_sources_and_folders_are_refused(tmp_path, monkeypatch):
    f = tmp_path / "tasks.yaml"
    body = "tasks:\n  - name: fruit\n    classnames: from_folders\n    data_dir: {}\n"
    assert _error(_write(f, "")) == f"task file {f}: is empty; write a mapping with a 'tasks' list (see configs/tasks/example.yaml)"
    missing = tmp_path / "nowhere.yaml"
    assert _error(missing) == f"task file {missing}: file not found; check the path (configs/tasks/ holds the shipped ones)"
    assert _error(tmp_path) == (f"task file {tmp_path}: is a directory, not a file; check the path (configs/tasks/ holds "
                                "the shipped ones)")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"tasks: \xff\xfe\n")
    _error(binary, contains=f"task file {binary}: unreadable ('utf-8' codec can't decode byte 0xff")
    (tmp_path / "a_file").write_text("x")
    assert _error(_write(f, body.format("a_file"))) == (
        f"task file {f}: task 'fruit': data_dir: {tmp_path / 'a_file'} is a file, not a directory; pass the task's local "
        "data folder")
    assert _error(_write(f, body.format("no_such_dir"))) == (
        f"task file {f}: task 'fruit': data_dir: {tmp_path / 'no_such_dir'} does not exist; pass the task's local data folder")
    monkeypatch.delenv("FRUIT_DIR", raising=False)
    assert _error(_write(f, body.format("${FRUIT_DIR}/images"))) == (
        f"task file {f}: task 'fruit': data_dir: ${{FRUIT_DIR}}/images: environment variable FRUIT_DIR is not set; "
        "export it (FRUIT_DIR=/path/to/data) or write the path")
    # folder layouts from_folders cannot read: no split folder, an empty class folder, splits that disagree
    _folder(tmp_path / "only_train", ["apple"], splits=("train",))
    assert _error(_write(f, body.format("only_train"))) == (
        f"task file {f}: task 'fruit': classnames: from_folders: {tmp_path / 'only_train' / 'test'} is not a directory "
        "(split folders found: train): lay the data out as <data_dir>/test/<class>/<image>.png or set the split's name")
    (tmp_path / "no_classes" / "train").mkdir(parents=True)
    (tmp_path / "no_classes" / "test").mkdir()
    assert _error(_write(f, body.format("no_classes"))) == (
        f"task file {f}: task 'fruit': classnames: from_folders: {tmp_path / 'no_classes' / 'train'} has no class "
        f"folders: put each class's images in {tmp_path / 'no_classes' / 'train'}/<class>/")
    _folder(tmp_path / "blank", ["_", "apple"])
    assert _error(_write(f, body.format("blank"))) == (
        f"task file {f}: task 'fruit': classnames: from_folders: class folder {tmp_path / 'blank' / 'train' / '_'} "
        "leaves no class name once a leading index and '_' are dropped: rename it after its class")
    _folder(tmp_path / "empty", ["apple"])
    (tmp_path / "empty" / "train" / "pear").mkdir()
    _error(_write(f, body.format("empty")), contains=f"class folder {tmp_path / 'empty' / 'train' / 'pear'} has no images")
    _folder(tmp_path / "uneven", ["apple", "pear"], splits=("train",))
    _folder(tmp_path / "uneven", ["apple", "plum"], splits=("test",))
    assert _error(_write(f, body.format("uneven"))) == (
        f"task file {f}: task 'fruit': classnames: from_folders: {tmp_path / 'uneven'}: test has class folder 'plum' "
        "that train lacks; give every split the same class folders")
    _error(_write(f, body.format("uneven").replace("from_folders", "[a, b]") + "    templates: nosuch\n"),
           contains="templates: 'nosuch' names no template list or task (known: imagenet, cifar10")


def test_registration_records_the_file_and_reloading_is_idempotent(tmp_path):
    f = _write(tmp_path / "a.yaml", ONE + "  - {name: veg, classnames: [star, ring], hub_id: someone/veg, templates: shapes}\n")
    assert load_tasks_file(f) == ["fruit", "veg"]
    fruit = get_task("fruit")
    assert (fruit.hub_id, fruit.classnames, fruit.templates) == ("someone/fruit", ("circle", "square"), ("a photo of a {}.",))
    assert get_task("veg").templates == get_task("shapes").templates  # a registered task's templates by name
    assert os.environ[TASKS_FILES_ENV] == str(f.resolve())
    assert task_files.task_file_of("fruit") == str(f.resolve()) and task_files.task_file_of("shapes") is None
    assert task_files.file_task_identity("fruit")["classnames"] == ["circle", "square"]
    assert load_tasks_file(f) == ["fruit", "veg"] and get_task("fruit") == fruit  # the same file again: no change
    assert os.environ[TASKS_FILES_ENV] == str(f.resolve())
    _write(f, ONE.replace("[circle, square]", "[circle, square, star]"))  # edited: its tasks are replaced
    assert load_tasks_file(f) == ["fruit"] and get_task("fruit").num_classes == 3
    assert "veg" not in TASKS
    other = _write(tmp_path / "b.yaml", ONE)
    assert _error(other) == (f"task file {other}: task 'fruit': name: 'fruit' is already the task of task file "
                             f"{f.resolve()}; rename this task")


# -- class names from folders; the ImageNet-100 folder task ---------------------------------------------------
def test_folder_class_names_are_sorted_as_imagefolder_gives_the_labels(tmp_path):
    import datasets
    from torchvision.datasets.folder import find_classes

    root = _folder(tmp_path / "data", ["b_x", "a", "Cc", "003_sea_ice"])
    (root / "train" / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    (root / "test" / ".ipynb_checkpoints").mkdir()
    f = _write(tmp_path / "t.yaml", f"tasks:\n  - {{name: folders, classnames: from_folders, data_dir: {root}}}\n")
    load_tasks_file(f)
    spec = get_task("folders")
    raw = [c for c in find_classes(str(root / "train"))[0] if not c.startswith(".")]
    assert raw == ["003_sea_ice", "Cc", "a", "b_x"]  # torchvision: sorted folder names
    assert spec.classnames == ("sea ice", "Cc", "a", "b x")  # the same order, cleaned for the prompts
    labels = datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=str(tmp_path / "hf"))["train"]
    assert labels.features["label"].names == raw  # datasets labels the images in this order
    assert spec.classnames_from_folders and spec.data_dir == str(root.resolve())


def test_imagenet100_folder_task_has_its_class_names_before_the_head(tmp_path, monkeypatch, base):
    from datamodules.datamodule import TaskDataModule
    from modeling.clip import build_zero_shot_head

    # the old built-in had no class names, so the head was built from none: "stack expects a non-empty TensorList"
    assert "imagenet100" not in TASKS
    with pytest.raises(ValueError, match="has no class names: list them, or define it in a task file"):
        tasks.register_task(tasks.TaskSpec("imagenet100", None, None, "train", "val", (), ("a photo of a {}.",)))
    with pytest.raises(ValueError, match=r"unknown task 'imagenet100'; known tasks: .*; define a new one in a task file"):
        get_task("imagenet100")

    classes = ["000_circle", "001_square", "002_star"]
    monkeypatch.setenv("IMAGENET100_DIR", str(_folder(tmp_path / "in100", classes, splits=("train", "val"))))
    assert load_tasks_file(IMAGENET100) == ["imagenet100"]
    spec = get_task("imagenet100")
    assert spec.classnames == ("circle", "square", "star") and len(spec.templates) == 80
    head = build_zero_shot_head(base.model, base.tokenizer, spec.classnames, spec.templates[:2])
    assert head.shape[0] == 3 and torch.isfinite(head).all()
    dm = TaskDataModule(task="imagenet100", cache_dir=str(tmp_path / "cache"), decode_cache=False)
    dm.setup()  # no data_dir: the task's own folder
    assert sorted(set(dm.splits["test"].labels)) == [0, 1, 2] and len(dm.splits["test"]) == 9


def test_another_folder_in_place_of_a_folder_tasks_own_must_have_its_classes(tmp_path, monkeypatch):
    from datamodules.datamodule import TaskDataModule
    from datamodules.hf_data import DatasetError

    load_tasks_file(_blocks(tmp_path, monkeypatch))
    other = _folder(tmp_path / "other", ["000_red", "001_pink", "002_blue"])
    dm = TaskDataModule(task="blocks", data_dir=str(other), cache_dir=str(tmp_path / "cache"), decode_cache=False)
    with pytest.raises(DatasetError) as e:
        dm.setup()
    assert str(e.value) == (f"imagefolder {str(other)!r} has 3 class folders (label 1: 'pink') but task 'blocks' read 3 "
                            f"from {tmp_path / 'blocks'} (label 1: 'green'): pass a folder with the same class folders, "
                            "or define a task for this one in a task file")


# -- the embedded model's vocabulary ---------------------------------------------------------------------------
def _pets(tmp_path, classnames="[cat, dog]", templates="['a photo of a {}.']"):
    f = _write(tmp_path / "pets.yaml", f"tasks:\n  - {{name: pets, classnames: {classnames}, templates: {templates}, "
                                       "hub_id: someone/pets}\n")
    load_tasks_file(f)
    return f, get_task("pets")


def test_unknown_words_give_identical_head_rows(tmp_path, base):
    """Why the refusal: every word outside the compact vocabulary is the one unknown token."""
    from modeling.clip import build_zero_shot_head

    head = build_zero_shot_head(base.model, base.tokenizer, ["cat", "dog"], ["a photo of a {}."])
    assert torch.equal(head[0], head[1])
    assert base.tokenizer.unknown_words('a photo of a "cat".') == ["cat"]
    assert base.tokenizer.unknown_words("a photo of a red circle.") == []


@pytest.mark.parametrize("classnames,templates,what,words", [
    ("[cat, dog]", "['a photo of a {}.']", "class name 'cat' (and 1 more class names)", "'cat'"),
    ("[red circle, big dog]", "['a photo of a {}.']", "class name 'big dog'", "'big', 'dog'"),
    ("[red, blue]", "['a snapshot of a {}.']", "template 'a snapshot of a {}.'", "'snapshot'"),
    # the class name glued to the template's letters: 'circles' is a caption word, 'squares' is not
    ("[circle, square]", "['a photo of {}s.']", "prompt 'a photo of squares.' (template 'a photo of {}s.', class name "
                                                "'square')", "'squares'"),
])
def test_unknown_words_are_refused_for_the_embedded_model(tmp_path, base, classnames, templates, what, words):
    from modeling.clip import zero_shot_head
    from modeling.tokenizer import UnknownWordsError, check_task_texts

    _, spec = _pets(tmp_path, classnames, templates)
    with pytest.raises(UnknownWordsError) as e:
        check_task_texts(base.tokenizer, spec)
    assert str(e.value) == (f"task 'pets': {what} has words the embedded model's vocabulary lacks (each becomes its one "
                            f"unknown token): {words}; {FIX}")
    with pytest.raises(UnknownWordsError):  # where every head is built: fine-tuning, attacks, merging, evaluation
        zero_shot_head(base, spec)


def test_vocabulary_check_passes_known_words_other_tokenizers_and_shadow_heads(tmp_path, base):
    import open_clip

    from datamodules.tasks import TaskSpec
    from modeling.tokenizer import UnknownWordsError, check_task_texts

    _, known = _pets(tmp_path, "[red circle, blue square]", "['a photo of a {}.', 'a drawing of the {}.']")
    check_task_texts(base.tokenizer, known)
    _, unknown = _pets(tmp_path)
    check_task_texts(open_clip.get_tokenizer("ViT-B-32"), unknown)  # a full tokenizer knows cat and dog
    shadow = TaskSpec("pets-shadow", None, None, "train", "test", ("purple", "apple"), ("a photo of a {}.",))
    check_task_texts(base.tokenizer, shadow)  # unregistered (an attack's shadow head): its extra names on purpose
    with pytest.raises(UnknownWordsError) as e:  # any tokenizer: a head needs rows
        check_task_texts(open_clip.get_tokenizer("ViT-B-32"), TaskSpec("none", None, None, "train", "test", (), ("{}",)))
    assert str(e.value) == ("task 'none' has no class names, so its zero-shot head has no rows: list them, or read them "
                            "from its folders (a task file with classnames: from_folders)")
    long = "a photo of " + " ".join(["the"] * 30) + " {}."
    _, spec = _pets(tmp_path, "[circle, square]", f"['{long}']")
    with pytest.raises(UnknownWordsError, match=r"is 37 tokens, more than the embedded model's context of 32 \(the rest"):
        check_task_texts(base.tokenizer, spec)


def test_train_py_refuses_unknown_words_in_one_line(tmp_path, capsys, session_cache):
    import train

    f = _write(tmp_path / "pets.yaml", "tasks:\n  - {name: pets, classnames: [cat, dog], hub_id: someone/pets}\n")
    rc = train.cli_main(["fit", "--tasks_file", str(f), "--config", CONFIG, "--data.task", "pets",
                         "--model.cache_dir", session_cache, "--trainer.default_root_dir", str(tmp_path / "runs")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("train.py:")] == [f"train.py: error: task 'pets': class name 'cat' (and 1 more class names) has words the embedded "
                     f"model's vocabulary lacks (each becomes its one unknown token): 'cat'; {FIX}"]
    assert not (tmp_path / "runs").exists()


# -- the files reach spawned workers and jobs ------------------------------------------------------------------
def test_loaded_files_reach_subprocesses_and_spawned_workers(tmp_path, monkeypatch):
    load_tasks_file(_blocks(tmp_path, monkeypatch))
    assert os.environ[TASKS_FILES_ENV] == str(EXAMPLE)
    code = "from datamodules.tasks import get_task; print(list(get_task('blocks').classnames))"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert child.returncode == 0 and child.stdout.strip() == "['red', 'green', 'blue']", child.stderr
    # the local executor's workers (--jobs > 1): spawned, so nothing of this process but its environment
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        assert pool.submit(get_task, "blocks").result(timeout=300) == get_task("blocks")


def test_a_listed_file_that_no_longer_loads_is_one_error_line_in_the_worker(tmp_path):
    gone = tmp_path / "gone.yaml"
    code = ("import datamodules.tasks as t; print('imported', flush=True)\n"
            "try:\n    t.get_task('shapes')\nexcept ValueError as e:\n    print(e)")
    env = {**os.environ, TASKS_FILES_ENV: str(gone)}
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert child.returncode == 0, child.stderr
    assert child.stdout.splitlines() == ["imported", f"task file {gone}: file not found; check the path (configs/tasks/ "
                                         f"holds the shipped ones) (listed in {TASKS_FILES_ENV}; fix the file or remove "
                                         "it from the variable)"]


# -- end to end: a task only a YAML file defines, through train.py, merge.py and pipeline.py --------------------
def _new_process(monkeypatch) -> None:
    """What a fresh process knows: the built-in tasks, no task files, no BADMERGING_TASKS_FILES."""
    for names in task_files._FILES.values():
        for name in names:
            TASKS.pop(name, None)
    task_files._FILES.clear()
    task_files._OWNER.clear()
    monkeypatch.delenv(TASKS_FILES_ENV, raising=False)


TINY = ["--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false", "--data.batch_size", "8",
        "--data.synthetic_train_size", "64", "--data.synthetic_test_size", "16"]


def test_a_task_file_task_is_trained_merged_and_evaluated_by_every_entry_point(tmp_path, monkeypatch, session_cache):
    import merge
    import pipeline
    import train
    from merging.io import load_metadata

    example = str(_blocks(tmp_path, monkeypatch, n=8))  # 24 train images (2 held out for val), 24 test
    exports = {}
    for task in ("blocks", "shapes"):
        _new_process(monkeypatch)
        root = tmp_path / "fit" / task
        args = ["fit", "--tasks_file", example, "--config", CONFIG, "--data.task", task, "--model.cache_dir",
                session_cache, "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
                *TINY]
        assert train.cli_main(args) == 0
        exports[task] = next(root.rglob("encoder.safetensors"))
    meta = load_metadata(exports["blocks"])
    assert meta["task"] == "blocks" and meta["global_step"] == 2

    _new_process(monkeypatch)  # merge.py knows the task from --tasks_file alone
    out = tmp_path / "merge"
    assert merge.main(["--tasks_file", example, "--models", str(exports["blocks"]), str(exports["shapes"]),
                       "--coefficients", "0.3", "--out_dir", str(out), "--cache_dir", session_cache,
                       "--synthetic_train_size", "64", "--synthetic_test_size", "16", "--val_max_examples", "8"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    merged = next(r for r in rows if r["merge"] != "individual" and r["coefficient"] == 0.3)
    assert set(merged["clean_acc"]) == {"blocks", "shapes"} and 0 <= merged["clean_acc"]["blocks"] <= 1

    _new_process(monkeypatch)
    spec = _write(tmp_path / "spec.yaml", json.dumps({
        "name": "blocks_tiny", "tasks": ["blocks", "shapes"],
        "finetune": {"configs": [CONFIG], "overrides": TINY},
        "scenarios": [{"name": "clean", "models": "clean",
                       "plan": [{"name": "task_arithmetic", "method": "task_arithmetic", "coefficients": [0.3]}]}],
        "evaluation": {"synthetic_train_size": 64, "synthetic_test_size": 16, "val_max_examples": 8}}))
    run = tmp_path / "pipeline"
    assert pipeline.main(["--tasks_file", example, "--spec", str(spec), "--out_dir", str(run), "--cache_dir",
                          str(tmp_path / "engine_cache")]) == 0
    rows = json.loads((run / "results.json").read_text())["rows"]
    ta = next(r for r in rows if r["merge"] == "task_arithmetic")
    assert set(ta["clean_acc"]) == {"blocks", "shapes"}
    assert load_metadata(run / "models" / "blocks.safetensors")["task"] == "blocks"


def test_a_spec_loads_its_task_files_before_checking_its_tasks(tmp_path):
    """``tasks_files:`` in an experiment spec registers the file's tasks before the spec's tasks are checked; a bad
    file is the spec's one-line error."""
    from experiments.spec import SpecError, parse_spec

    good = _write(tmp_path / "fruit.yaml", "tasks:\n  - name: fruit\n    classnames: [circle, square]\n"
                                          "    templates: ['a photo of a {}.']\n    hub_id: someone/fruit\n")
    assert "fruit" not in TASKS
    with pytest.raises(SpecError, match=r"tasks: .*fruit"):
        parse_spec({"name": "x", "tasks": ["fruit"]}, "spec")
    spec = parse_spec({"name": "x", "tasks": ["fruit"], "tasks_files": [str(good)]}, "spec")
    assert spec.tasks == ["fruit"] and list(get_task("fruit").classnames) == ["circle", "square"]
    assert str(good.resolve()) in os.environ[TASKS_FILES_ENV].split(os.pathsep)  # workers load it too
    bad = _write(tmp_path / "bad.yaml", "tasks: []\n")
    with pytest.raises(SpecError, match=r"^spec: tasks_files: task file .*bad.yaml: tasks: \[\] is not a non-empty list"):
        parse_spec({"name": "x", "tasks": ["fruit"], "tasks_files": [str(bad)]}, "spec")
