"""Loading tasks through ``datasets`` from small data sets built on disk (no network)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from datamodules import hf_data
from datamodules.hf_data import (
    DatasetError,
    ImageClassificationDataset,
    load_task_splits,
    resolve_classnames,
    split_train_val,
)
from datamodules.tasks import TaskSpec

N_CLASSES = 3
N_TRAIN_PER_CLASS = 20  # official train: 60 -> val int(6.0) = 6, train 54
N_TEST_PER_CLASS = 4  # official test: 12
CLASSES = ("cat", "dog", "bird")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    try:
        import huggingface_hub.constants as hub_constants

        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True, raising=False)
    except ImportError:  # pragma: no cover
        pass


def _image(label: int, index: int, mode: str = "RGB") -> PILImage.Image:
    """8×8 grey image of level 80·label (one pixel varies with ``index`` so images differ)."""
    array = np.full((8, 8, 3), 80 * label, dtype=np.uint8)
    array[0, 0, 1] = 80 * label + index % 40
    image = PILImage.fromarray(array)
    return image.convert(mode) if mode != "RGB" else image


def _label_of(image) -> int:
    if isinstance(image, torch.Tensor):
        red = float(image[0].mean()) * 255.0
    else:
        red = float(np.asarray(image.convert("RGB"))[..., 0].mean())
    return int(round(red / 80.0))


def _split(per_class: int, image_col: str = "image", label_col: str = "label", extra: bool = False) -> datasets.Dataset:
    images, labels = [], []
    for c in range(N_CLASSES):
        for i in range(per_class):
            images.append(_image(c, i))
            labels.append(c)
    features = {image_col: datasets.Image(), label_col: datasets.ClassLabel(names=list(CLASSES))}
    data = {image_col: images, label_col: labels}
    if extra:
        features["coarse_label"] = datasets.Value("int64")
        data["coarse_label"] = [0] * len(labels)
    return datasets.Dataset.from_dict(data, features=datasets.Features(features))


def _dict(image_col="image", label_col="label", extra=False) -> datasets.DatasetDict:
    return datasets.DatasetDict(
        train=_split(N_TRAIN_PER_CLASS, image_col, label_col, extra),
        test=_split(N_TEST_PER_CLASS, image_col, label_col, extra),
    )


def _spec(**kw) -> TaskSpec:
    args = dict(
        name="toy",
        hub_id=None,
        hub_config=None,
        train_split="train",
        test_split="test",
        classnames=CLASSES,
        templates=("a photo of a {}.",),
    )
    args.update(kw)
    return TaskSpec(**args)


def _check_protocol(splits, n_val=6):
    assert set(splits) == {"train", "val", "test"}
    n_official = N_CLASSES * N_TRAIN_PER_CLASS
    assert len(splits["val"]) == n_val
    assert len(splits["train"]) == n_official - n_val
    assert len(splits["test"]) == N_CLASSES * N_TEST_PER_CLASS
    for ds in splits.values():
        assert ds.column_names == ["image", "label"]
    for name in ("train", "val", "test"):
        row = splits[name][0]
        assert isinstance(row["image"], PILImage.Image)
        assert row["label"] == _label_of(row["image"])


@pytest.fixture(scope="module")
def saved_dict_dir(tmp_path_factory) -> Path:
    """A DatasetDict with CIFAR-100-like columns (img, fine_label, coarse_label) via save_to_disk."""
    path = tmp_path_factory.mktemp("saved_dict")
    _dict("img", "fine_label", extra=True).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def imagefolder_dir(tmp_path_factory) -> Path:
    """<dir>/<split>/<NNN_class>/*.png; sorted directory names give the label order."""
    root = tmp_path_factory.mktemp("imagefolder")
    for split, per_class in (("train", N_TRAIN_PER_CLASS), ("test", N_TEST_PER_CLASS)):
        for c, name in enumerate(CLASSES):
            class_dir = root / split / f"{c:03d}_{name}"
            class_dir.mkdir(parents=True)
            for i in range(per_class):
                _image(c, i, mode="L" if i % 2 else "RGB").save(class_dir / f"{i}.png")
    return root


# ---------------------------------------------------------------------------------------------
# The three on-disk formats
# ---------------------------------------------------------------------------------------------


def test_saved_dataset_dict(saved_dict_dir, tmp_path):
    spec = _spec(image_column="img", label_column="fine_label")
    splits = load_task_splits(spec, str(saved_dict_dir), cache_dir=str(tmp_path / "cache"))
    _check_protocol(splits)
    # Nothing was written into the data directory (split indices stay in memory).
    assert sorted(os.listdir(saved_dict_dir)) == ["dataset_dict.json", "test", "train"]
    for split in ("train", "test"):
        assert not [f for f in os.listdir(saved_dict_dir / split) if f.startswith("cache-")]


def test_saved_dataset_per_split(tmp_path):
    for name, ds in _dict().items():
        ds.save_to_disk(str(tmp_path / "data" / name))
    splits = load_task_splits(_spec(), tmp_path / "data", cache_dir=str(tmp_path / "cache"))
    _check_protocol(splits)


def test_imagefolder(imagefolder_dir, tmp_path):
    splits = load_task_splits(_spec(), imagefolder_dir, cache_dir=str(tmp_path / "cache"))
    _check_protocol(splits)
    features = splits["train"].features["label"]
    assert isinstance(features, datasets.ClassLabel)
    assert features.names == [f"{c:03d}_{n}" for c, n in enumerate(CLASSES)]
    # Every example's label agrees with the class its pixels encode.
    for ds in splits.values():
        for row in ds:
            assert row["label"] == _label_of(row["image"])
    # A task without class names takes them from the class directories.
    assert resolve_classnames(_spec(classnames=()), splits["train"]) == CLASSES
    no_names = load_task_splits(_spec(classnames=()), imagefolder_dir, cache_dir=str(tmp_path / "cache"))
    assert len(no_names["test"]) == 12


def test_imagefolder_split_folders_keep_their_names_and_a_task_reads_its_own_folder(imagefolder_dir, tmp_path):
    """datasets calls a folder "val" split "validation" and "eval" "test"; the task names its splits by folder."""
    root = tmp_path / "valfolder"
    for folder, split in (("train", "train"), ("val", "test")):
        shutil.copytree(imagefolder_dir / split, root / folder)
    splits = load_task_splits(_spec(test_split="val"), root, cache_dir=str(tmp_path / "cache"))
    assert len(splits["test"]) == N_CLASSES * N_TEST_PER_CLASS
    # no data_dir: the spec's own (a task file's local data) before its hub id
    own = load_task_splits(_spec(hub_id="someone/absent", data_dir=str(imagefolder_dir)), None,
                           cache_dir=str(tmp_path / "cache"))
    _check_protocol(own)


def test_hub_format_parquet(tmp_path):
    root = tmp_path / "hub"
    (root / "data").mkdir(parents=True)
    for name, ds in _dict("img", "label").items():
        ds.to_parquet(str(root / "data" / f"{name}-00000-of-00001.parquet"))
    splits = load_task_splits(_spec(image_column="img"), root, cache_dir=str(tmp_path / "cache"))
    _check_protocol(splits)


def test_hub_format_config_subdir_and_readme(tmp_path):
    # Two configs side by side, as ufldl-stanford/svhn (cropped_digits, full_numbers).
    root = tmp_path / "svhn"
    for config, dd in (("cropped_digits", _dict()), ("full_numbers", _dict())):
        (root / config).mkdir(parents=True)
        for name, ds in dd.items():
            if config == "full_numbers":
                ds = ds.select(range(5))
            ds.to_parquet(str(root / config / f"{name}-00000-of-00001.parquet"))
    spec = _spec(hub_config="cropped_digits")
    _check_protocol(load_task_splits(spec, root, cache_dir=str(tmp_path / "cache1")))
    (root / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: cropped_digits\n  data_files:\n"
        "  - split: train\n    path: cropped_digits/train-*\n"
        "  - split: test\n    path: cropped_digits/test-*\n"
        "- config_name: full_numbers\n  data_files:\n"
        "  - split: train\n    path: full_numbers/train-*\n"
        "  - split: test\n    path: full_numbers/test-*\n"
        "---\n# toy svhn\n"
    )
    _check_protocol(load_task_splits(spec, root, cache_dir=str(tmp_path / "cache2")))


def test_task_name_and_val_options(saved_dict_dir, tmp_path, monkeypatch):
    from datamodules import tasks

    monkeypatch.setattr(tasks, "TASKS", dict(tasks.TASKS))
    tasks.register_task(_spec(name="toy_cifar", image_column="img", label_column="fine_label"))
    splits = load_task_splits("toy_cifar", saved_dict_dir, max_val=2, cache_dir=str(tmp_path / "c"))
    _check_protocol(splits, n_val=2)
    splits = load_task_splits("toy_cifar", saved_dict_dir, val_fraction=0.0, cache_dir=str(tmp_path / "c"))
    assert len(splits["val"]) == 0 and len(splits["train"]) == 60


# ---------------------------------------------------------------------------------------------
# Split protocol
# ---------------------------------------------------------------------------------------------


def test_split_matches_train_test_split():
    ds = datasets.Dataset.from_dict({"idx": list(range(1000))})
    train, val = split_train_val(ds, val_fraction=0.1, max_val=5000, seed=0)
    assert len(val) == 100 and len(train) == 900
    reference = ds.train_test_split(test_size=100, seed=0)
    assert list(val["idx"]) == list(reference["test"]["idx"])
    assert list(train["idx"]) == list(reference["train"]["idx"])
    assert sorted(list(train["idx"]) + list(val["idx"])) == list(range(1000))
    # The cap: min(10%, max_val).
    train, val = split_train_val(ds, val_fraction=0.1, max_val=30, seed=0)
    assert len(val) == 30 and len(train) == 970
    # Deterministic for a seed, different across seeds.
    assert list(split_train_val(ds, seed=0)[1]["idx"]) == list(split_train_val(ds, seed=0)[1]["idx"])
    assert list(split_train_val(ds, seed=1)[1]["idx"]) != list(split_train_val(ds, seed=0)[1]["idx"])
    with pytest.raises(ValueError):
        split_train_val(ds, val_fraction=1.0)


# ---------------------------------------------------------------------------------------------
# Errors: one line, naming the input and the fix
# ---------------------------------------------------------------------------------------------


def _raises(match: str, *args, **kwargs) -> str:
    with pytest.raises(DatasetError, match=match) as info:
        load_task_splits(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert isinstance(info.value, ValueError)
    return message


def test_error_missing_dir(tmp_path):
    missing = tmp_path / "nope"
    message = _raises("does not exist", _spec(), missing)
    assert str(missing) in message


def test_error_empty_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    message = _raises("no dataset found", _spec(), tmp_path / "empty")
    assert "empty" in message


def test_error_missing_columns(tmp_path):
    ds = datasets.Dataset.from_dict({"pixels": [1, 2, 3], "label": [0, 1, 2]})
    datasets.DatasetDict(train=ds, test=ds).save_to_disk(str(tmp_path / "d"))
    message = _raises("no image column 'image'", _spec(), tmp_path / "d")
    assert "pixels" in message and str(tmp_path / "d") in message
    ds = datasets.Dataset.from_dict({"image": [_image(0, 0)] * 3, "target": ["a", "b", "c"]})
    datasets.DatasetDict(train=ds, test=ds).save_to_disk(str(tmp_path / "e"))
    _raises("no label column 'label'", _spec(), tmp_path / "e")


def test_error_text_labels(tmp_path):
    ds = datasets.Dataset.from_dict({"image": [_image(0, 0)] * 3, "label": ["a", "b", "c"]})
    datasets.DatasetDict(train=ds, test=ds).save_to_disk(str(tmp_path / "d"))
    _raises("not integer class ids", _spec(), tmp_path / "d")


def test_error_empty_split(tmp_path):
    dd = _dict()
    datasets.DatasetDict(train=dd["train"], test=dd["test"].select([])).save_to_disk(str(tmp_path / "s"))
    message = _raises("split 'test' is empty", _spec(), tmp_path / "s")
    assert str(tmp_path / "s") in message
    (tmp_path / "d" / "data").mkdir(parents=True)
    dd["train"].to_parquet(str(tmp_path / "d" / "data" / "train-00000-of-00001.parquet"))
    dd["test"].select([]).to_parquet(str(tmp_path / "d" / "data" / "test-00000-of-00001.parquet"))
    message = _raises("split 'test' is empty", _spec(), tmp_path / "d", cache_dir=str(tmp_path / "cache"))
    assert str(tmp_path / "d") in message


def test_error_missing_split(tmp_path):
    datasets.DatasetDict(train=_dict()["train"]).save_to_disk(str(tmp_path / "d"))
    message = _raises("no test split 'test'", _spec(), tmp_path / "d")
    assert "found: train" in message and "TaskSpec.test_split" in message
    message = _raises("no train split 'training'", _spec(train_split="training"), tmp_path / "d")


def test_error_label_out_of_range(tmp_path):
    images = [_image(0, i) for i in range(6)]
    ds = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2, 3, 4, 5]})
    datasets.DatasetDict(train=ds, test=ds).save_to_disk(str(tmp_path / "d"))
    message = _raises(r"labels \[3, 4, 5\] outside 0\.\.2", _spec(), tmp_path / "d")
    assert "toy" in message
    ds = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2, -1, 0, 1]})
    datasets.DatasetDict(train=ds, test=ds).save_to_disk(str(tmp_path / "e"))
    _raises(r"labels \[-1\] outside", _spec(), tmp_path / "e")


def test_error_no_source(tmp_path):
    _raises("has no hub id", _spec(hub_id=None))
    spec = _spec(hub_id="nonexistent-org-xyz/nothing")
    message = _raises("could not load hub dataset", spec, cache_dir=str(tmp_path))
    assert "data_dir" in message


# ---------------------------------------------------------------------------------------------
# The torch view
# ---------------------------------------------------------------------------------------------


def test_image_classification_dataset(imagefolder_dir, tmp_path, monkeypatch):
    splits = load_task_splits(_spec(), imagefolder_dir, cache_dir=str(tmp_path / "cache"))
    torch_ds = ImageClassificationDataset(splits["test"])
    assert len(torch_ds) == 12
    labels = torch_ds.labels
    assert sorted(set(labels)) == [0, 1, 2]
    for i in range(len(torch_ds)):
        x, y = torch_ds[i]
        assert isinstance(x, torch.Tensor) and x.shape == (3, 8, 8) and x.dtype == torch.float32
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        assert type(y) is int and y == labels[i] == _label_of(x)

    seen_modes = []

    def transform(image):
        seen_modes.append(image.mode)
        return torch.tensor(image.size)

    calls = []
    original = datasets.Image.decode_example

    def counting(self, value, token_per_repo_id=None):
        calls.append(1)
        return original(self, value, token_per_repo_id=token_per_repo_id)

    monkeypatch.setattr(datasets.Image, "decode_example", counting)
    torch_ds = ImageClassificationDataset(splits["train"], transform)
    x, y = torch_ds[np.int64(3)]
    assert x.tolist() == [8, 8] and seen_modes == ["RGB"]
    assert len(calls) == 1, "one decode per access"
    loader = torch.utils.data.DataLoader(torch_ds, batch_size=5, shuffle=False)
    xb, yb = next(iter(loader))
    assert xb.shape == (5, 2) and yb.dtype == torch.int64
    assert set(seen_modes) == {"RGB"}


def test_image_classification_dataset_columns():
    ds = datasets.Dataset.from_dict(
        {"img": [_image(2, 0, mode="L")], "y": [2], "other": ["x"]},
        features=datasets.Features(
            {"img": datasets.Image(), "y": datasets.Value("int64"), "other": datasets.Value("string")}
        ),
    )
    torch_ds = ImageClassificationDataset(ds, image_column="img", label_column="y")
    x, y = torch_ds[0]
    assert x.shape == (3, 8, 8) and y == 2
    with pytest.raises(DatasetError, match="lacks"):
        ImageClassificationDataset(ds)
    assert hf_data.DatasetError is DatasetError


# ---------------------------------------------------------------------------------------------
# Checking a source without reading it (the paper specs' missing-data check)
# ---------------------------------------------------------------------------------------------


def test_check_task_source_accepts_every_layout_without_loading(saved_dict_dir, imagefolder_dir, tmp_path, monkeypatch):
    def unread(*args, **kwargs):  # the check never reads the data
        raise AssertionError("check_task_source read the data")

    monkeypatch.setattr(datasets, "load_dataset", unread)
    monkeypatch.setattr(datasets, "load_from_disk", unread)
    assert hf_data.check_task_source(_spec(), str(imagefolder_dir)) == f"imagefolder {str(imagefolder_dir)!r}"
    assert hf_data.check_task_source(_spec(), str(saved_dict_dir)).startswith("saved dataset")
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    (hub / "train-00000.parquet").write_bytes(b"")
    assert hf_data.check_task_source(_spec(), str(tmp_path / "hub")).startswith("hub-format directory")
    folder_task = _spec(data_dir=str(imagefolder_dir))  # a task file's own folder when none is passed
    assert hf_data.check_task_source(folder_task) == f"imagefolder {str(imagefolder_dir)!r}"


def test_check_task_source_names_the_missing_split_or_folder_and_the_layouts(imagefolder_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(imagefolder_dir / "train", partial / "train")
    with pytest.raises(DatasetError) as e:
        hf_data.check_task_source(_spec(), str(partial))
    assert str(e.value) == (f"no 'test' split of task 'toy' in {str(partial)!r}: expected {partial}/{{train,test}}/<class>/"
                            f"<image> (an imagefolder), a DatasetDict.save_to_disk folder, or hub parquet files under "
                            f"{partial}/data/")
    (partial / "test" / "000_cat").mkdir(parents=True)  # a split folder without images is missing too
    with pytest.raises(DatasetError, match="no 'test' split"):
        hf_data.check_task_source(_spec(), str(partial))
    with pytest.raises(DatasetError, match="does not exist"):
        hf_data.check_task_source(_spec(), str(tmp_path / "absent"))
    with pytest.raises(DatasetError, match="has no hub id and no local data: give the folder setting"):
        hf_data.check_task_source(_spec(), local="the folder setting")


def test_check_task_source_refuses_a_hub_dataset_that_is_offline_and_not_cached(tmp_path):
    spec = _spec(name="toy_hub", hub_id="nobody/no-such-dataset-badmerging")
    with pytest.raises(DatasetError) as e:
        hf_data.check_task_source(spec, cache_dir=str(tmp_path / "empty"), local="--data.data_dir")
    message = str(e.value)
    assert message.startswith("task 'toy_hub': hub dataset nobody/no-such-dataset-badmerging is not available (")
    assert "run once with network access to download it (HF_DATASETS_OFFLINE unset), or give --data.data_dir" in message
    assert "\n" not in message


# ---------------------------------------------------------------------------------------------
# The train transform (paper recipe) on the train split only
# ---------------------------------------------------------------------------------------------


def test_open_clip_train_transform_on_the_train_split_only(tmp_path, monkeypatch):
    from torchvision import transforms as T

    from datamodules.datamodule import TaskDataModule
    from datamodules.decoded import DecodedImageDataset
    from datamodules.tasks import TASKS

    rng = np.random.default_rng(0)
    for split, per_class in (("train", N_TRAIN_PER_CLASS), ("test", N_TEST_PER_CLASS)):
        for c, name in enumerate(CLASSES):
            (tmp_path / "noise" / split / f"{c:03d}_{name}").mkdir(parents=True)
            for i in range(per_class):  # 32 px noise: every crop of it differs
                PILImage.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    tmp_path / "noise" / split / f"{c:03d}_{name}" / f"{i}.png")
    monkeypatch.setitem(TASKS, "toy_folder_tt", _spec(name="toy_folder_tt"))
    common = dict(task="toy_folder_tt", data_dir=str(tmp_path / "noise"), cache_dir=str(tmp_path / "cache"))
    dm = TaskDataModule(**common, train_transform="open_clip")
    dm.setup("fit")
    crop = dm.splits["train"].transform.transforms[0]
    assert isinstance(crop, T.RandomResizedCrop) and crop.scale == (0.9, 1.0)  # open_clip's preprocess_train
    assert crop.interpolation == T.InterpolationMode.BICUBIC
    for split in ("val", "test"):  # evaluation keeps the deterministic transform, decoded once
        assert not any(isinstance(s, T.RandomResizedCrop) for s in dm.splits[split].transform.transforms)
        assert isinstance(dm.dataset(split), DecodedImageDataset)
    train = dm.dataset("train")
    assert not isinstance(train, DecodedImageDataset)  # a fresh crop per draw cannot be cached
    torch.manual_seed(0)
    draws = [train[0][0] for _ in range(4)]
    assert all(d.shape == (3, 24, 24) for d in draws)
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    default = TaskDataModule(**common)  # the embedded recipe: the eval transform everywhere, train decoded
    default.setup("fit")
    assert isinstance(default.dataset("train"), DecodedImageDataset)
    with pytest.raises(ValueError, match="train_transform='random' is unknown; use one of eval, open_clip"):
        TaskDataModule(**common, train_transform="random")
