"""Class names of an imagefolder layout ``<data_dir>/<split>/<class>/<image>``, read from its folder names.

The label order is what ``datasets.load_dataset("imagefolder")`` (and torchvision's ``ImageFolder``) give:
the class folders sorted by name; hidden folders are not classes. Names are cleaned for the prompts: a
leading index is dropped (``000_tench`` -> ``tench``, so sorting by the raw names keeps the intended
order) and ``_`` becomes a space.

Pure ``os``: task files are read at every import of ``datamodules.tasks`` (spawned workers too), so this
must stay cheap — one directory listing per split and one ``scandir`` per class folder until an image.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["IMAGE_SUFFIXES", "FolderLayoutError", "clean_folder_name", "class_folders", "folder_classnames"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class FolderLayoutError(ValueError):
    """A data directory that is not an imagefolder layout; the message names the path and the fix."""


def clean_folder_name(name: str) -> str:
    """``"000_abbey"`` -> ``"abbey"``, ``"sea_ice"`` -> ``"sea ice"``."""
    name = re.sub(r"^\d+[_\-. ]+(?=\D)", "", name)
    return name.replace("_", " ").strip()


def _has_image(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return any(e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES for e in entries)


def class_folders(data_dir: str | os.PathLike, split: str) -> list[str]:
    """The sorted class folder names of ``<data_dir>/<split>``; :class:`FolderLayoutError` unless each holds images."""
    root = Path(data_dir) / split
    if not root.is_dir():
        found = sorted(p.name for p in Path(data_dir).iterdir() if p.is_dir()) if Path(data_dir).is_dir() else []
        raise FolderLayoutError(f"{root} is not a directory (split folders found: {', '.join(found) or 'none'}): "
                                f"lay the data out as <data_dir>/{split}/<class>/<image>.png or set the split's name")
    names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise FolderLayoutError(f"{root} has no class folders: put each class's images in {root}/<class>/")
    empty = [n for n in names if not _has_image(root / n)]
    if empty:
        raise FolderLayoutError(f"class folder {root / empty[0]} has no images directly in it "
                                f"({', '.join(sorted(IMAGE_SUFFIXES))}): add its images or remove the folder")
    return names


def folder_classnames(data_dir: str | os.PathLike, splits: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Cleaned class names from the class folders, in label order; every split must have the same folders.

    Unequal folder sets would give labels that no single split's listing explains (``datasets`` takes the
    union), and a class missing from train is never learnt: both are refused, naming the folder.
    """
    listed = {split: class_folders(data_dir, split) for split in dict.fromkeys(splits)}
    first, *rest = listed
    for split in rest:
        extra = sorted(set(listed[split]) - set(listed[first]))
        missing = sorted(set(listed[first]) - set(listed[split]))
        if extra or missing:
            what = (f"{split} has class folder {extra[0]!r} that {first} lacks" if extra
                    else f"{split} lacks class folder {missing[0]!r} that {first} has")
            raise FolderLayoutError(f"{data_dir}: {what}; give every split the same class folders")
    blank = [n for n in listed[first] if not clean_folder_name(n)]
    if blank:
        raise FolderLayoutError(f"class folder {Path(data_dir) / first / blank[0]} leaves no class name once a leading "
                                "index and '_' are dropped: rename it after its class")
    return tuple(clean_folder_name(n) for n in listed[first])
