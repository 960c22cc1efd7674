"""A task split decoded once to a uint8 array on disk, read back without PNG decoding or PIL.

``ImageClassificationDataset`` decodes and transforms every image each time it is drawn (≈0.7 ms per
24 px image on this CPU, a third of a fine-tuning step). For a deterministic transform of the form
``Compose([<PIL steps>..., ToTensor(), Normalize(mean, std)])`` (open_clip's eval transform, which
training uses too) the PIL steps are applied once and their output is stored as ``(N, S, S, 3)``
uint8 in a ``.npy`` file (memory-mapped, so a large split costs page cache, not RAM):

    x[i] = (u8[i].permute(2, 0, 1).float() / 255 − mean) / std        bit-identical to the transform

Files sit under ``<cache_dir>/decoded/<key>/`` with ``key`` = hash(dataset fingerprint, split length,
transform repr); they are written to a temporary name and renamed, so a crash leaves no half cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torchvision import transforms as T
from tqdm.auto import tqdm

from datamodules.hf_data import ImageClassificationDataset, _to_pil

__all__ = ["DecodedImageDataset", "decodable", "decoded_dataset"]


def _split_transform(transform) -> tuple[list, torch.Tensor, torch.Tensor] | None:
    """(PIL steps, mean (3,1,1), std (3,1,1)) if ``transform`` ends in ToTensor, Normalize; else None."""
    steps = getattr(transform, "transforms", None)
    if not steps or len(steps) < 2 or not isinstance(steps[-2], T.ToTensor) or not isinstance(steps[-1], T.Normalize):
        return None
    norm = steps[-1]
    mean = torch.as_tensor(norm.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.as_tensor(norm.std, dtype=torch.float32).view(-1, 1, 1)
    return list(steps[:-2]), mean, std


def decodable(transform) -> bool:
    """Whether ``transform`` has the deterministic PIL-steps + ToTensor + Normalize form this cache needs."""
    parts = _split_transform(transform)
    return parts is not None and not any(isinstance(s, (T.RandomResizedCrop, T.RandomHorizontalFlip, T.RandomCrop))
                                         for s in parts[0])


class DecodedImageDataset(torch.utils.data.Dataset):
    """``(x (3, S, S) float32, label int)`` from a uint8 array; ``__getitems__`` normalises a whole batch at once.

    ``source`` (the ``ImageClassificationDataset`` it was decoded from) stays reachable for code that
    needs the original images (e.g. stage 1's random resized crops): ``.dataset``, ``.image_column``.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: torch.Tensor, std: torch.Tensor,
                 source: ImageClassificationDataset | None = None):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels in the decoded cache; delete it to rebuild")
        self.images, self._labels, self.mean, self.std, self.source = images, labels, mean, std, source
        if source is not None:
            self.dataset, self.image_column, self.label_column = source.dataset, source.image_column, source.label_column

    @property
    def labels(self) -> list[int]:
        return self._labels.tolist()

    def __len__(self) -> int:
        return len(self._labels)

    def _tensor(self, index) -> torch.Tensor:
        u8 = torch.from_numpy(np.ascontiguousarray(self.images[index]))
        # Same ops and order as ToTensor + Normalize, so the values are bit-identical.
        x = u8.permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)
        return x.sub_(self.mean).div_(self.std)

    def __getitem__(self, index: int):
        return self._tensor([int(index)])[0], int(self._labels[index])

    def __getitems__(self, indices: list[int]):
        order = np.asarray(indices)
        x = self._tensor(order)
        return list(zip(x.unbind(0), self._labels[order].tolist()))


def _cache_key(dataset: ImageClassificationDataset, transform) -> str:
    fingerprint = getattr(dataset.dataset, "_fingerprint", None)
    if fingerprint is None:
        raise ValueError("dataset has no fingerprint")
    payload = json.dumps([fingerprint, len(dataset), repr(transform), dataset.image_column, dataset.label_column])
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _save_npy(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def decoded_dataset(dataset: ImageClassificationDataset, cache_dir: str | os.PathLike, chunk: int = 1000,
                    desc: str = "decode") -> DecodedImageDataset:
    """The decoded twin of ``dataset`` (built on first use, then memory-mapped from ``cache_dir``)."""
    parts = _split_transform(dataset.transform)
    if parts is None or not decodable(dataset.transform):
        raise ValueError(f"transform {dataset.transform!r} is not PIL steps + ToTensor + Normalize; use the plain dataset")
    pil_steps, mean, std = parts
    folder = Path(cache_dir) / "decoded" / _cache_key(dataset, dataset.transform)
    images_path, labels_path = folder / "images.npy", folder / "labels.npy"
    if not (images_path.exists() and labels_path.exists()):
        folder.mkdir(parents=True, exist_ok=True)
        raw = dataset.dataset
        arrays = []
        for start in tqdm(range(0, len(raw), chunk), desc=desc, leave=False):
            rows = raw[start:start + chunk][dataset.image_column]
            for value in rows:
                image = _to_pil(value)
                image = image.convert("RGB") if image.mode != "RGB" else image
                for step in pil_steps:
                    image = step(image)
                arrays.append(np.asarray(image, dtype=np.uint8))
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"the transform yields images of several shapes {sorted(shapes)}; it must crop to one size")
        images = np.stack(arrays) if arrays else np.zeros((0, 1, 1, 3), np.uint8)
        labels = np.asarray(dataset.labels, dtype=np.int64)
        _save_npy(labels_path, labels)
        _save_npy(images_path, images)  # last: its presence marks a complete cache
    return DecodedImageDataset(np.load(images_path, mmap_mode="r"), np.load(labels_path), mean, std, dataset)
