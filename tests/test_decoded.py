"""The decoded-image cache: the same tensors as the transform, built once, refused for random transforms."""

import pytest
import torch
from torchvision import transforms as T

from datamodules.datamodule import TaskDataModule
from datamodules.decoded import DecodedImageDataset, decodable, decoded_dataset


def _dm(cache, decode):
    return TaskDataModule(task="digits", synthetic_train_size=60, synthetic_test_size=20, batch_size=16,
                          eval_batch_size=32, cache_dir=cache, decode_cache=decode)


def test_decoded_batches_equal_the_transform(tmp_path):
    plain, fast = _dm(str(tmp_path), False), _dm(str(tmp_path), True)
    for dm in (plain, fast):
        dm.prepare_data()
        dm.setup("fit")
    assert isinstance(fast.dataset("train"), DecodedImageDataset)
    for split in ("train", "val", "test"):
        a = torch.utils.data.DataLoader(plain.dataset(split), batch_size=16)
        b = torch.utils.data.DataLoader(fast.dataset(split), batch_size=16)
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)  # bit-identical, same order
    # the shuffled training loaders draw the same batches too
    (xa, ya), (xb, yb) = next(iter(plain.train_dataloader())), next(iter(fast.train_dataloader()))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # built once: a second module reads the files (no rebuild)
    files = sorted((tmp_path / "decoded").rglob("images.npy"))
    assert len(files) == 3
    stamps = [f.stat().st_mtime_ns for f in files]
    again = _dm(str(tmp_path), True)
    again.prepare_data()
    again.setup("fit")
    again.dataset("train")
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert not list((tmp_path / "decoded").rglob("*.tmp"))


def test_random_transforms_are_not_cached(tmp_path):
    dm = _dm(str(tmp_path), True)
    dm.prepare_data()
    dm.setup("fit")
    random = T.Compose([T.RandomResizedCrop(24), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    assert decodable(dm.transform) and not decodable(random)
    source = dm.splits["train"]
    source.transform = random
    with pytest.raises(ValueError, match="not PIL steps"):
        decoded_dataset(source, tmp_path)
