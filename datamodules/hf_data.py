"""Loading a task's images through Hugging Face ``datasets``.

:func:`load_task_splits` turns a :class:`~datamodules.tasks.TaskSpec` (and optionally a local
directory) into ``{"train", "val", "test"}`` datasets with exactly two columns, ``image``
(PIL images) and ``label`` (int), following the split protocol of docs/design.md §6:

* ``val``  = a held-out ``min(int(val_fraction · |official train|), max_val)`` examples of the
  official train split, drawn with ``seed`` (0) exactly as
  ``Dataset.train_test_split(test_size=n_val, seed=seed)`` draws them;
* ``train`` = the rest of the official train split;
* ``test`` = the official test split.

Sources, in this order:

1. ``data_dir`` written by ``DatasetDict.save_to_disk`` (or ``<data_dir>/<split>`` each written by
   ``Dataset.save_to_disk``), read with ``load_from_disk``;
2. ``data_dir`` in hub format (parquet/arrow/csv/json files, e.g. ``data/train-*.parquet``, with
   or without a ``README.md`` declaring configs), read with ``load_dataset(data_dir)``;
3. ``data_dir`` in imagefolder layout ``<data_dir>/<split>/<class>/*.png``, read with
   ``load_dataset("imagefolder", data_dir=...)``; labels are the class directories in sorted
   order, so name them so that sorting gives the task's label order (e.g. ``000_abbey``);
4. no ``data_dir``: the task's own ``spec.data_dir`` (a task file's local data) as above, else
   ``load_dataset(spec.hub_id, spec.hub_config)`` (cached by ``datasets``; honours ``HF_DATASETS_OFFLINE``).

Every problem with the input is a :class:`DatasetError` (a ``ValueError``) with a one-line
message that names the input and the fix. Nothing here writes into ``data_dir``: the split
indices are kept in memory.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import datasets
import numpy as np
import torch
from PIL import Image as PILImage

from datamodules.folders import IMAGE_SUFFIXES, clean_folder_name
from datamodules.tasks import TaskSpec, get_task

__all__ = [
    "DatasetError",
    "check_task_source",
    "load_task_splits",
    "load_raw_splits",
    "resolve_classnames",
    "split_train_val",
    "ImageClassificationDataset",
]

DATA_FILE_SUFFIXES = {".parquet", ".arrow", ".csv", ".json", ".jsonl", ".tsv"}


class DatasetError(ValueError):
    """A data set that cannot be used as given; the message names the input and the fix."""


def _one_line(text: Any) -> str:
    """First non-empty line of an exception message (messages must stay on one line)."""
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()
    return type(text).__name__ if isinstance(text, BaseException) else ""


# ---------------------------------------------------------------------------------------------
# Reading the raw (official) splits
# ---------------------------------------------------------------------------------------------


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def _readme_declares_configs(path: Path) -> bool:
    readme = path / "README.md"
    if not readme.is_file():
        return False
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return False
    header = text.split("---", 2)[1] if text.count("---") >= 2 else ""
    return re.search(r"^configs\s*:", header, flags=re.MULTILINE) is not None


def _empty_saved_splits(path: Path) -> list[str]:
    """Splits of a save_to_disk directory that hold no data (``load_from_disk`` cannot read them)."""
    candidates: list[tuple[str, Path]] = []
    if (path / "dataset_dict.json").is_file():
        try:
            names = json.loads((path / "dataset_dict.json").read_text())["splits"]
        except (ValueError, KeyError, TypeError):
            names = []
        candidates = [(str(n), path / str(n)) for n in names]
    elif _is_saved_dataset(path):
        candidates = [("train", path)]
    else:
        candidates = [(p.name, p) for p in sorted(path.iterdir()) if p.is_dir() and _is_saved_dataset(p)]
    empty = []
    for name, split_dir in candidates:
        try:
            state = json.loads((split_dir / "state.json").read_text())
        except (OSError, ValueError):
            continue
        if state.get("_data_files") == []:
            empty.append(name)
    return empty


def _has_files(path: Path, suffixes: set[str]) -> bool:
    return any(p.is_file() and p.suffix.lower() in suffixes for p in path.rglob("*"))


def _as_split_dict(obj: Any) -> dict[str, datasets.Dataset]:
    if isinstance(obj, datasets.DatasetDict):
        return {str(k): v for k, v in obj.items()}
    if isinstance(obj, datasets.Dataset):
        return {"train": obj}
    raise TypeError(f"expected a Dataset or DatasetDict, got {type(obj).__name__}")


def _load_hub_dataset(spec: TaskSpec, cache_dir: str | None) -> tuple[dict[str, datasets.Dataset], str]:
    """Source 4: ``load_dataset(spec.hub_id, spec.hub_config)`` (no ``data_dir``)."""
    if spec.hub_id is None:
        raise DatasetError(
            f"task {spec.name!r} has no hub id: "
            "pass data_dir=<a saved dataset, hub-format or imagefolder directory>"
        )
    source = f"hub dataset {spec.hub_id}" + (f" ({spec.hub_config})" if spec.hub_config else "")
    try:
        loaded = datasets.load_dataset(spec.hub_id, spec.hub_config, cache_dir=cache_dir)
    except Exception as exc:  # network, offline mode, missing cache, ...
        raise DatasetError(
            f"could not load {source}: {_one_line(exc)}; run once with network access to cache it "
            "(HF_DATASETS_OFFLINE unset) or pass data_dir=<local copy>"
        ) from exc
    return _as_split_dict(loaded), source


def _existing_data_dir(data_dir: str | Path, spec: TaskSpec) -> Path:
    """``data_dir`` as an expanded path; :class:`DatasetError` unless it is an existing directory."""
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise DatasetError(
            f"data directory {str(path)!r} for task {spec.name!r} does not exist: "
            "pass an existing directory or data_dir=None to use the hub"
        )
    if not path.is_dir():
        raise DatasetError(
            f"data_dir {str(path)!r} for task {spec.name!r} is a file, not a directory: "
            "pass the directory that holds the dataset"
        )
    return path


def _load_saved(path: Path, split_dirs: list[Path]) -> tuple[dict[str, datasets.Dataset], str]:
    """Source 1: a save_to_disk ``DatasetDict``/``Dataset`` at ``path``, or one saved ``Dataset`` per ``split_dirs``."""
    source = f"saved dataset {str(path)!r}"
    # load_from_disk fails obscurely on a split without data files, so name the split first.
    empty = _empty_saved_splits(path)
    if empty:
        raise DatasetError(
            f"{source} split {empty[0]!r} is empty: add examples to it or point data_dir elsewhere"
        )
    if (path / "dataset_dict.json").is_file() or _is_saved_dataset(path):
        try:
            return _as_split_dict(datasets.load_from_disk(str(path))), source
        except Exception as exc:
            raise DatasetError(
                f"could not read {source}: {_one_line(exc)}; re-create it with DatasetDict.save_to_disk"
            ) from exc
    try:
        return {p.name: datasets.load_from_disk(str(p)) for p in split_dirs}, source
    except Exception as exc:
        raise DatasetError(
            f"could not read {source}: {_one_line(exc)}; re-create each split with Dataset.save_to_disk"
        ) from exc


def _load_hub_format(
    path: Path, spec: TaskSpec, cache_dir: str | None
) -> tuple[dict[str, datasets.Dataset], str]:
    """Source 2: data files (or a README declaring configs) at ``path``, read with ``load_dataset(path)``.

    ``spec.hub_config`` selects a README-declared config, or else the sub-directory of that name.
    """
    source = f"hub-format directory {str(path)!r}"
    target, name = path, None
    if spec.hub_config:
        if _readme_declares_configs(path):
            name = spec.hub_config
        elif (path / spec.hub_config).is_dir():
            target = path / spec.hub_config
    try:
        loaded = datasets.load_dataset(str(target), name, cache_dir=cache_dir)
    except Exception as exc:
        no_data = re.search(r'Instruction "([^"]+)" corresponds to no data', str(exc))
        if no_data:
            raise DatasetError(
                f"{source} split {no_data.group(1)!r} is empty: add examples to it or point data_dir elsewhere"
            ) from exc
        raise DatasetError(
            f"could not load {source}: {_one_line(exc)}; lay it out like the hub (data/<split>-*.parquet) "
            "or use save_to_disk / imagefolder"
        ) from exc
    return _as_split_dict(loaded), source


def _load_imagefolder(path: Path, cache_dir: str | None) -> tuple[dict[str, datasets.Dataset], str]:
    """Source 3: ``<path>/<split>/<class>/<image>`` read with ``load_dataset("imagefolder")``."""
    source = f"imagefolder {str(path)!r}"
    try:
        loaded = datasets.load_dataset("imagefolder", data_dir=str(path), cache_dir=cache_dir)
    except Exception as exc:
        raise DatasetError(
            f"could not load {source}: {_one_line(exc)}; use the layout <dir>/<split>/<class>/<image>.png"
        ) from exc
    return _folder_split_names(_as_split_dict(loaded), path), source


# datasets names the splits it infers from folder names canonically: a folder "val" is split "validation",
# "eval" is "test" (datasets.data_files.SPLIT_KEYWORDS); a task names its splits by their folders.
_SPLIT_KEYWORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "dev", "val"),
                   "test": ("test", "testing", "eval", "evaluation")}


def _folder_split_names(splits: dict[str, datasets.Dataset], path: Path) -> dict[str, datasets.Dataset]:
    """``splits`` keyed by the split folder each came from (``val``, not datasets' ``validation``)."""
    out = {}
    for name, ds in splits.items():
        folders = [w for w in _SPLIT_KEYWORDS.get(name, ()) if (path / w).is_dir()]
        out[folders[0] if not (path / name).is_dir() and len(folders) == 1 else name] = ds
    return out


def load_raw_splits(
    spec: TaskSpec | str, data_dir: str | Path | None = None, *, cache_dir: str | None = None
) -> tuple[dict[str, datasets.Dataset], str]:
    """The official splits of a task as stored, and a short description of where they came from.

    See the module docstring for the accepted sources. A single saved ``Dataset`` (not a
    ``DatasetDict``) counts as the ``train`` split.
    """
    spec = get_task(spec) if isinstance(spec, str) else spec
    if data_dir is None:
        data_dir = spec.data_dir
    if data_dir is None:
        return _load_hub_dataset(spec, cache_dir)

    path = _existing_data_dir(data_dir, spec)
    # 1. save_to_disk output (a DatasetDict, a single Dataset, or one saved Dataset per split).
    split_dirs = sorted(p for p in path.iterdir() if p.is_dir() and _is_saved_dataset(p))
    if (path / "dataset_dict.json").is_file() or _is_saved_dataset(path) or split_dirs:
        return _load_saved(path, split_dirs)
    # 2. Hub format: data files, or a README declaring configs.
    if _readme_declares_configs(path) or _has_files(path, DATA_FILE_SUFFIXES):
        return _load_hub_format(path, spec, cache_dir)
    # 3. Imagefolder: <dir>/<split>/<class>/<image>.
    if _has_files(path, IMAGE_SUFFIXES):
        return _load_imagefolder(path, cache_dir)
    raise DatasetError(
        f"no dataset found in {str(path)!r} for task {spec.name!r}: expected a save_to_disk directory, "
        "hub-format parquet files under data/, or images as <split>/<class>/*.png"
    )


def _first_file(path: Path, suffixes: set[str]) -> bool:
    """Whether ``path`` holds a file with one of ``suffixes`` (stops at the first: a large folder is not walked)."""
    return next((True for p in path.rglob("*") if p.suffix.lower() in suffixes and p.is_file()), False)


def _split_folder(path: Path, split: str) -> Path | None:
    """The folder of ``split`` in an imagefolder (``val`` for ``validation``, as ``datasets`` names them)."""
    for name in (split, *next((v for v in _SPLIT_KEYWORDS.values() if split in v), ())):
        if (path / name).is_dir():
            return path / name
    return None


def check_task_source(spec: TaskSpec | str, data_dir: str | Path | None = None, *, cache_dir: str | None = None,
                      local: str = "a local copy") -> str:
    """Where ``load_raw_splits`` would read the task from, checked without reading the data; a short description.

    Local data (``data_dir``, else the task's own): the directory exists and is a save_to_disk folder, hub-format
    data files, or an imagefolder with a ``<train_split>`` and a ``<test_split>`` folder of images. Hub data:
    ``datasets.load_dataset_builder`` resolves the id (the network, or the local cache when offline). Anything
    else is a one-line :class:`DatasetError` naming the task, its source and how to provide it (``local``: where
    the caller takes a local folder, e.g. a setting's name).
    """
    spec = get_task(spec) if isinstance(spec, str) else spec
    data_dir = spec.data_dir if data_dir is None else data_dir
    layouts = ("<dir>/{train,test}/<class>/<image> (an imagefolder), a DatasetDict.save_to_disk folder, "
               "or hub parquet files under <dir>/data/")
    if data_dir is None:
        if spec.hub_id is None:
            raise DatasetError(f"task {spec.name!r} has no hub id and no local data: give {local}, {layouts}")
        source = f"hub dataset {spec.hub_id}" + (f" ({spec.hub_config})" if spec.hub_config else "")
        try:
            datasets.load_dataset_builder(spec.hub_id, spec.hub_config, cache_dir=cache_dir)
        except Exception as exc:  # offline and not cached, no network, unknown id
            raise DatasetError(
                f"task {spec.name!r}: {source} is not available ({_one_line(exc)}); run once with network access "
                f"to download it (HF_DATASETS_OFFLINE unset), or give {local}: {layouts}"
            ) from None
        return source
    path = _existing_data_dir(data_dir, spec)
    if (path / "dataset_dict.json").is_file() or _is_saved_dataset(path) or any(
            p.is_dir() and _is_saved_dataset(p) for p in path.iterdir()):
        return f"saved dataset {str(path)!r}"
    if _readme_declares_configs(path) or _first_file(path, DATA_FILE_SUFFIXES):
        return f"hub-format directory {str(path)!r}"
    missing = [s for s in (spec.train_split, spec.test_split)
               if (folder := _split_folder(path, s)) is None or not _first_file(folder, IMAGE_SUFFIXES)]
    if missing:
        raise DatasetError(
            f"no {' or '.join(repr(m) for m in missing)} split of task {spec.name!r} in {str(path)!r}: expected "
            f"{layouts.replace('<dir>', str(path))}"
        )
    return f"imagefolder {str(path)!r}"


# ---------------------------------------------------------------------------------------------
# Normalising columns, checking labels
# ---------------------------------------------------------------------------------------------


def _pick_column(
    ds: datasets.Dataset, wanted: str, canonical: str, feature_type: type, what: str, source: str, split: str
) -> str:
    cols = ds.column_names
    if wanted in cols:
        return wanted
    if canonical in cols:
        return canonical
    typed = [c for c, f in ds.features.items() if isinstance(f, feature_type)]
    if len(typed) == 1:
        return typed[0]
    raise DatasetError(
        f"{source} split {split!r} has no {what} column {wanted!r} (columns: {', '.join(cols) or 'none'}): "
        f"rename it to {canonical!r} or set TaskSpec.{what}_column"
    )


def _normalise_split(ds: datasets.Dataset, spec: TaskSpec, source: str, split: str) -> datasets.Dataset:
    image_col = _pick_column(ds, spec.image_column, "image", datasets.Image, "image", source, split)
    label_col = _pick_column(ds, spec.label_column, "label", datasets.ClassLabel, "label", source, split)
    if image_col == label_col:
        raise DatasetError(
            f"{source} split {split!r} uses column {image_col!r} for both image and label: "
            "set TaskSpec.image_column and label_column to different columns"
        )
    ds = ds.select_columns([image_col, label_col])
    renames = {c: n for c, n in ((image_col, "image"), (label_col, "label")) if c != n}
    if renames:
        ds = ds.rename_columns(renames)

    image_feature = ds.features["image"]
    if not isinstance(image_feature, datasets.Image) or not image_feature.decode:
        if isinstance(image_feature, datasets.Image) or (
            isinstance(image_feature, datasets.Value) and image_feature.dtype in ("string", "large_string", "binary")
        ):
            ds = ds.cast_column("image", datasets.Image())
        else:
            raise DatasetError(
                f"{source} split {split!r}: column {image_col!r} holds {image_feature!r}, not images: "
                "store images (datasets.Image) or image paths in it"
            )

    label_feature = ds.features["label"]
    is_int = isinstance(label_feature, datasets.ClassLabel) or (
        isinstance(label_feature, datasets.Value) and label_feature.dtype.startswith(("int", "uint"))
    )
    if not is_int:
        raise DatasetError(
            f"{source} split {split!r}: label column {label_col!r} is {label_feature!r}, not integer class ids: "
            "encode labels as integers (ClassLabel) in the order of the task's class names"
        )
    return ds


_clean_name = clean_folder_name  # "000_abbey" -> "abbey"


def resolve_classnames(
    spec: TaskSpec | str, dataset: datasets.Dataset | Mapping[str, datasets.Dataset]
) -> tuple[str, ...]:
    """The task's class names: ``spec.classnames``, or else the data set's ``ClassLabel`` names.

    Names read from the data are cleaned: a leading index (``"000_"``) is dropped and ``_``
    becomes a space. Raises :class:`DatasetError` when neither gives names.
    """
    spec = get_task(spec) if isinstance(spec, str) else spec
    if spec.classnames:
        return spec.classnames
    first = dataset if isinstance(dataset, datasets.Dataset) else next(iter(dataset.values()), None)
    feature = None if first is None else first.features.get("label")
    if isinstance(feature, datasets.ClassLabel) and feature.names:
        return tuple(_clean_name(n) for n in feature.names)
    raise DatasetError(
        f"task {spec.name!r} has no class names and its data has no ClassLabel 'label' feature: "
        "register the task with classnames or load class-directory (imagefolder) data"
    )


def _check_folder_classes(spec: TaskSpec, train: datasets.Dataset, source: str) -> None:
    """A task whose class names were read from its folders, given another folder: the classes must agree."""
    feature = train.features.get("label")
    if not spec.classnames_from_folders or not isinstance(feature, datasets.ClassLabel):
        return
    found = tuple(_clean_name(n) for n in feature.names)
    if found != spec.classnames:
        i = next((i for i, (a, b) in enumerate(zip(found, spec.classnames)) if a != b),
                 min(len(found), len(spec.classnames)))
        raise DatasetError(
            f"{source} has {len(found)} class folders (label {i}: {_at(found, i)!r}) but task {spec.name!r} read "
            f"{len(spec.classnames)} from {spec.data_dir} (label {i}: {_at(spec.classnames, i)!r}): pass a folder with "
            "the same class folders, or define a task for this one in a task file"
        )


def _at(names: tuple[str, ...], i: int) -> str:
    return names[i] if i < len(names) else "<none>"


def _check_labels(ds: datasets.Dataset, n_classes: int, spec: TaskSpec, source: str, split: str) -> None:
    feature = ds.features["label"]
    if isinstance(feature, datasets.ClassLabel) and feature.num_classes != n_classes:
        warnings.warn(
            f"{source} split {split!r} declares {feature.num_classes} classes but task {spec.name!r} "
            f"has {n_classes} class names; check that the task maps to this data set",
            stacklevel=3,
        )
    values = ds.unique("label")
    if not values:
        return
    bad = [v for v in values if v is None or v < 0 or v >= n_classes]
    if bad:
        shown = sorted(bad, key=lambda v: (v is None, v if v is not None else 0))[:5]
        raise DatasetError(
            f"{source} split {split!r} has labels {shown} outside 0..{n_classes - 1} "
            f"(task {spec.name!r} has {n_classes} class names): fix the labels or the task's classnames"
        )


# ---------------------------------------------------------------------------------------------
# Split protocol
# ---------------------------------------------------------------------------------------------


def split_train_val(
    train: datasets.Dataset, val_fraction: float = 0.1, max_val: int = 5000, seed: int = 0
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split the official train set into (train, val) as docs/design.md §6 prescribes.

    ``n_val = min(int(len(train) · val_fraction), max_val)`` (at least 1 when ``val_fraction > 0``
    and there are two or more examples). The draw is the one
    ``train.train_test_split(test_size=n_val, seed=seed)`` makes (``val`` = its ``"test"``,
    ``train`` = its ``"train"``), computed here with in-memory indices so that nothing is written
    next to a read-only or shared data set.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_val < 0:
        raise ValueError(f"max_val must be >= 0, got {max_val}")
    n = len(train)
    n_val = min(int(n * val_fraction), max_val)
    if n_val == 0 and val_fraction > 0 and max_val > 0 and n >= 2:
        n_val = 1
    if n_val == 0:
        return train, train.select([], keep_in_memory=True)
    # Same draw as datasets.Dataset.train_test_split(test_size=n_val, seed=seed, shuffle=True).
    permutation = np.random.default_rng(seed).permutation(n)
    val_idx, train_idx = permutation[:n_val], permutation[n_val:]
    return train.select(train_idx, keep_in_memory=True), train.select(val_idx, keep_in_memory=True)


def load_task_splits(
    spec: TaskSpec | str,
    data_dir: str | Path | None = None,
    val_fraction: float = 0.1,
    max_val: int = 5000,
    seed: int = 0,
    *,
    cache_dir: str | None = None,
) -> dict[str, datasets.Dataset]:
    """``{"train", "val", "test"}`` datasets (columns ``image``, ``label``) for one task.

    ``spec`` may be a registered task name. ``cache_dir`` is passed to ``load_dataset`` (the
    ``datasets`` cache by default). Raises :class:`DatasetError` for a missing directory, an
    unreadable or empty data set, a missing split, missing image/label columns, or labels out of
    range of the task's class names.
    """
    spec = get_task(spec) if isinstance(spec, str) else spec
    raw, source = load_raw_splits(spec, data_dir, cache_dir=cache_dir)

    picked: dict[str, datasets.Dataset] = {}
    for role, split in (("train", spec.train_split), ("test", spec.test_split)):
        if split not in raw:
            found = ", ".join(sorted(raw)) or "none"
            raise DatasetError(
                f"{source} has no {role} split {split!r} (found: {found}): "
                f"provide a {split!r} split or set TaskSpec.{role}_split"
            )
        ds = raw[split]
        if len(ds) == 0:
            raise DatasetError(f"{source} split {split!r} is empty: add examples to it or point data_dir elsewhere")
        picked[role] = _normalise_split(ds, spec, source, split)

    classnames = resolve_classnames(spec, picked["train"])
    _check_folder_classes(spec, picked["train"], source)
    for role, split in (("train", spec.train_split), ("test", spec.test_split)):
        _check_labels(picked[role], len(classnames), spec, source, split)

    train, val = split_train_val(picked["train"], val_fraction=val_fraction, max_val=max_val, seed=seed)
    if len(train) == 0:
        raise DatasetError(
            f"{source} split {spec.train_split!r} has only {len(picked['train'])} examples, none left for "
            "training after the validation hold-out: add examples or lower val_fraction"
        )
    return {"train": train, "val": val, "test": picked["test"]}


# ---------------------------------------------------------------------------------------------
# Torch view
# ---------------------------------------------------------------------------------------------


def _to_pil(value: Any) -> PILImage.Image:
    if isinstance(value, PILImage.Image):
        return value
    if isinstance(value, dict):  # undecoded datasets.Image value
        if value.get("bytes") is not None:
            return PILImage.open(io.BytesIO(value["bytes"]))
        if value.get("path"):
            return PILImage.open(value["path"])
    if isinstance(value, np.ndarray):
        return PILImage.fromarray(value)
    if isinstance(value, (str, Path)):
        return PILImage.open(value)
    raise TypeError(f"cannot turn a {type(value).__name__} into an image")


def _pil_to_tensor(image: PILImage.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


class ImageClassificationDataset(torch.utils.data.Dataset):
    """A ``datasets.Dataset`` with ``image``/``label`` columns as a torch map-style dataset.

    ``dataset[i]`` decodes example ``i``'s image once, converts it to RGB and returns
    ``(transform(image), int(label))``. Without a transform the image becomes a float tensor
    ``(3, H, W)`` in ``[0, 1]``. Any torchvision-style callable (e.g. open_clip's preprocess) works.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        transform: Callable[[PILImage.Image], Any] | None = None,
        *,
        image_column: str = "image",
        label_column: str = "label",
    ) -> None:
        missing = [c for c in (image_column, label_column) if c not in dataset.column_names]
        if missing:
            raise DatasetError(
                f"dataset with columns {dataset.column_names} lacks {missing}: "
                "load it with load_task_splits or pass image_column/label_column"
            )
        if len(dataset.column_names) > 2:  # decode only what is returned
            dataset = dataset.select_columns([image_column, label_column])
        self.dataset = dataset
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        row = self.dataset[int(index)]  # one row: decodes this image only
        image = _to_pil(row[self.image_column])
        if image.mode != "RGB":
            image = image.convert("RGB")
        x = self.transform(image) if self.transform is not None else _pil_to_tensor(image)
        return x, int(row[self.label_column])

    @property
    def labels(self) -> list[int]:
        """All labels, read without decoding any image."""
        return [int(v) for v in self.dataset[self.label_column]]
