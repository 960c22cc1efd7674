"""The task registry: class names, templates, look-up and registration."""

from __future__ import annotations

import dataclasses

import pytest

from datamodules import tasks
from datamodules.tasks import TASKS, TaskSpec, UnknownTaskError, get_task, register_task, render_prompts

KNOWN_CLASS_COUNTS = {
    "sun397": 397,
    "stanford_cars": 196,
    "resisc45": 45,
    "eurosat": 10,
    "svhn": 10,
    "gtsrb": 43,
    "mnist": 10,
    "dtd": 47,
    "cifar10": 10,
    "cifar100": 100,
    "oxford_pets": 37,
    "flowers102": 102,
    "stl10": 10,
}


@pytest.mark.parametrize("name,count", sorted(KNOWN_CLASS_COUNTS.items()))
def test_real_task_class_counts(name, count):
    spec = get_task(name)
    assert spec.num_classes == count == len(spec.classnames)
    assert len(set(spec.classnames)) == count, "class names must be unique"
    assert all(isinstance(c, str) and c.strip() == c and c for c in spec.classnames)
    assert spec.hub_id and not spec.synthetic


@pytest.mark.parametrize("name", sorted(TASKS))
def test_templates_have_one_placeholder(name):
    spec = get_task(name)
    assert spec.templates
    for template in spec.templates:
        assert template.count("{}") == 1
        assert "CLASS" in template.format("CLASS")
    for prompts in render_prompts(spec, spec.classnames[:3] or ("x",)):
        assert len(prompts) == len(spec.templates)


def test_label_order_matches_hub_mirrors():
    cars = get_task("stanford_cars").classnames
    assert cars[:2] == ("AM General Hummer SUV 2000", "Acura RL Sedan 2012")
    assert cars[5] == "Acura Integra Type R 2001"  # cars_meta.mat order, not alphabetical
    assert cars[-1] == "smart fortwo Convertible 2012"
    sun = get_task("sun397").classnames
    assert sun[0] == "abbey" and sun[1] == "airplane cabin" and sun[-1] == "youth hostel"
    assert list(sun) == sorted(sun, key=lambda s: s.replace(" ", "_"))  # ClassName.txt is sorted
    assert get_task("gtsrb").classnames[14] == "stop"
    assert get_task("cifar100").classnames[26] == "crab"
    assert get_task("eurosat").classnames[0] == "annual crop land"
    assert get_task("mnist").classnames == tuple(str(i) for i in range(10))


def test_hub_columns_and_configs():
    assert get_task("cifar10").image_column == "img"
    c100 = get_task("cifar100")
    assert (c100.image_column, c100.label_column) == ("img", "fine_label")
    svhn = get_task("svhn")
    assert (svhn.hub_id, svhn.hub_config) == ("ufldl-stanford/svhn", "cropped_digits")
    assert get_task("sun397").hub_id == "tanganke/sun397"
    assert get_task("mnist").hub_id == "ylecun/mnist"
    assert get_task("svhn").templates == ('a photo of the number: "{}".',)


def test_get_task_aliases():
    assert get_task("Stanford-Cars") is TASKS["stanford_cars"]
    assert get_task("tanganke/sun397") is TASKS["sun397"]
    spec = TASKS["dtd"]
    assert get_task(spec) is spec


def test_unknown_task_error():
    with pytest.raises(UnknownTaskError) as info:
        get_task("no_such_task")
    err = info.value
    assert isinstance(err, KeyError) and isinstance(err, ValueError)
    message = str(err)
    assert "\n" not in message
    assert "no_such_task" in message and "sun397" in message and "cifar100" in message
    with pytest.raises(KeyError):
        get_task("imagenet1k")


def test_register_task(monkeypatch):
    monkeypatch.setattr(tasks, "TASKS", dict(tasks.TASKS))
    spec = TaskSpec("toy", None, None, "train", "test", ["a", "b"], ["a photo of a {}."], synthetic=True)
    assert spec.classnames == ("a", "b") and isinstance(spec.templates, tuple)
    assert register_task(spec) is spec
    assert tasks.get_task("toy") is spec
    register_task(TaskSpec("toy", None, None, "train", "test", ("a", "b"), ("a photo of a {}.",), synthetic=True))
    other = dataclasses.replace(spec, classnames=("a", "b", "c"))
    with pytest.raises(ValueError, match="already registered"):
        register_task(other)
    register_task(other, overwrite=True)
    assert tasks.get_task("toy").num_classes == 3
    assert "toy" not in TASKS  # the real registry is untouched (monkeypatched copy)


def test_taskspec_validation():
    with pytest.raises(ValueError, match="exactly one"):
        TaskSpec("bad", None, None, "train", "test", ("a",), ("no placeholder",))
    with pytest.raises(ValueError, match="no prompt templates"):
        TaskSpec("bad", None, None, "train", "test", ("a",), ())
    with pytest.raises(ValueError, match="duplicate"):
        TaskSpec("bad", None, None, "train", "test", ("a", "a"), ("{}",))
    spec = get_task("eurosat")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "x"  # type: ignore[misc]
    assert spec.prompts("forest")[0] == "a centered satellite photo of forest."
    assert hash(spec) == hash(dataclasses.replace(spec))


def test_every_registered_task_has_class_names(monkeypatch):
    """A head is built from the class names as soon as a model resolves the task: none may be empty."""
    assert all(spec.classnames for spec in TASKS.values())
    assert "imagenet100" not in TASKS  # a folder task now: configs/tasks/imagenet100.yaml
    monkeypatch.setattr(tasks, "TASKS", dict(tasks.TASKS))
    with pytest.raises(ValueError) as info:
        register_task(TaskSpec("folder_task", None, None, "train", "test", (), ("a photo of a {}.",)))
    assert str(info.value) == ("task 'folder_task' has no class names: list them, or define it in a task file with "
                               "'classnames: from_folders' and its data_dir (see configs/tasks/)")


def test_unknown_task_error_points_to_task_files():
    with pytest.raises(UnknownTaskError) as info:
        get_task("sun398")
    assert str(info.value).startswith("unknown task 'sun398'; known tasks: cifar10, cifar100, colours, digits, ")
    assert str(info.value).endswith("; define a new one in a task file (--tasks_file, see configs/tasks/)")
    assert len(tasks.NAMED_TEMPLATES["imagenet"]) == 80  # what a task file's `templates: imagenet` names
