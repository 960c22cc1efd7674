"""One LightningDataModule for every task: hub id, local directory, or the synthetic suite.

Synthetic tasks are rendered once into a saved DatasetDict under ``cache_dir`` and then read by the
same loader as hub data (``datamodules.hf_data.load_task_splits``), so one code path serves both.
Splits follow docs/design.md §6: train = official train minus a held-out val (10%, at most 5000, seed 0),
test = official test.

Under DDP the val and test loaders read an unpadded shard per rank (``UnrepeatedDistributedSampler``:
rank r gets examples r, r + W, ...), so every example is counted once and the torchmetrics states
(summed across ranks) give exactly the single-process CA / ASR / RA counts. Lightning's own
DistributedSampler would pad the last shard with repeated examples.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import open_clip
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader

from datamodules.decoded import decodable, decoded_dataset
from datamodules.hf_data import ImageClassificationDataset, load_task_splits
from datamodules.synthetic import synthetic_task_dir
from datamodules.tasks import get_task


# The project's own open_clip model configs (badmerging-tiny) are JSON files shipped beside the modeling code.
# The preprocessing needs only their vision fields, so the data floor reads the files and does not import
# modeling, which sits above it (modeling.pretrain trains on this package's renders).
MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "modeling" / "model_configs"


def model_config(model_name: str) -> dict:
    """The open_clip config of ``model_name``: open_clip's registry, else the project's JSON file."""
    cfg = open_clip.get_model_config(model_name)
    path = MODEL_CONFIG_DIR / f"{model_name}.json"
    if cfg is None and path.parent == MODEL_CONFIG_DIR and path.is_file():  # a plain name, no path into elsewhere
        cfg = json.loads(path.read_text(encoding="utf-8"))
    if cfg is None:
        raise ValueError(f"unknown model {model_name!r}; use an open_clip name such as ViT-B-32 or badmerging-tiny")
    return cfg


TRAIN_TRANSFORMS = ("eval", "open_clip")


def clip_transform(model_name: str, train: bool = False):
    """open_clip's eval transform (resize, centre crop, to tensor, CLIP normalisation) for ``model_name``, or with
    ``train`` its train transform (RandomResizedCrop scale 0.9–1, bicubic, to tensor, normalisation: what
    ``open_clip.create_model_and_transforms`` returns as ``preprocess_train`` and the reference code trains with)."""
    cfg = model_config(model_name)
    vcfg, pcfg = cfg["vision_cfg"], cfg.get("preprocess_cfg", {})
    size = vcfg["image_size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    # the same statistics open_clip gives the model (model.visual.image_mean/std), so triggers and data agree
    mean = pcfg.get("mean") or vcfg.get("image_mean") or open_clip.OPENAI_DATASET_MEAN
    std = pcfg.get("std") or vcfg.get("image_std") or open_clip.OPENAI_DATASET_STD
    return open_clip.image_transform(size, is_train=train, mean=mean, std=std)


class TaskDataModule(L.LightningDataModule):
    """Train/val/test loaders of one task.

    Args:
        task: a registered task name (``get_task``), e.g. ``shapes`` or ``cifar100``.
        data_dir: local copy of a real task (saved dataset, imagefolder or hub-format folder);
            ``None`` reads the task's own ``data_dir`` (a task file's) or loads ``hub_id`` through
            ``datasets`` (real tasks), or renders (synthetic).
        model_name: the open_clip model whose preprocessing is applied.
        synthetic_train_size / synthetic_test_size / synthetic_difficulty: the synthetic renders.
        seed: the data seed (synthetic renders and the shuffling generator).
        decode_cache: keep each split decoded once as uint8 under ``cache_dir/decoded`` and read it
            back memory-mapped (``datamodules.decoded``): the same tensors, without per-step PNG
            decoding and PIL transforms. Only for deterministic transforms; ``False`` reads the dataset.
        train_transform: the train split's transform: ``eval`` (the eval transform, the embedded recipe's)
            or ``open_clip`` (open_clip's train transform, a fresh random resized crop per draw: the paper
            recipe's, for fine-tuning, injection and stage 1). Val and test always use the eval transform.
            With ``open_clip`` the train split is read undecoded, and a run resumed mid-epoch sees the same
            images in the same order but draws new crops.
    """

    def __init__(
        self,
        task: str = "shapes",
        data_dir: str | None = None,
        model_name: str = "badmerging-tiny",
        batch_size: int = 128,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        cache_dir: str = ".cache/badmerging",
        synthetic_train_size: int = 40000,
        synthetic_test_size: int = 1000,
        synthetic_difficulty: float = 1.0,
        val_fraction: float = 0.1,
        max_val: int = 5000,
        seed: int = 0,
        decode_cache: bool = True,
        train_transform: str = "eval",
    ):
        super().__init__()
        if train_transform not in TRAIN_TRANSFORMS:
            raise ValueError(f"train_transform={train_transform!r} is unknown; use one of {', '.join(TRAIN_TRANSFORMS)}")
        self.save_hyperparameters()
        self.spec = get_task(task)
        self.transform = clip_transform(model_name)
        self.train_transform = clip_transform(model_name, train=True) if train_transform == "open_clip" else self.transform
        self.splits: dict[str, ImageClassificationDataset] = {}

    def _source_dir(self) -> str | None:
        h = self.hparams
        if self.spec.synthetic and h.data_dir is None:
            return synthetic_task_dir(self.spec.name, h.cache_dir, h.synthetic_train_size, h.synthetic_test_size,
                                      seed=h.seed, difficulty=h.synthetic_difficulty)
        return h.data_dir

    def prepare_data(self) -> None:
        self._source_dir()  # renders synthetic data once, on one process

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        raw = load_task_splits(self.spec, self._source_dir(), val_fraction=self.hparams.val_fraction, max_val=self.hparams.max_val)
        self.splits = {k: ImageClassificationDataset(v, self.train_transform if k == "train" else self.transform)
                       for k, v in raw.items()}
        self._decoded: dict = {}

    def dataset(self, split: str):
        """The split as the loaders read it: decoded once (``decode_cache``) or the plain dataset (random transforms)."""
        if not (self.hparams.decode_cache and decodable(self.splits[split].transform)):
            return self.splits[split]
        if split not in self._decoded:  # per split, on first use: evaluation never decodes train
            self._decoded[split] = decoded_dataset(self.splits[split], self.hparams.cache_dir,
                                                   desc=f"decode {self.spec.name}/{split}")
        return self._decoded[split]

    def _loader(self, split: str, train: bool, shard: bool = True) -> DataLoader:
        h = self.hparams
        workers = h.num_workers
        dataset = self.dataset(split)
        trainer = self.trainer
        sampler = None
        if not train and shard and trainer is not None and trainer.world_size > 1:
            # Lightning keeps a DistributedSampler it finds; this one does not pad (exact eval counts)
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                                   shuffle=False)
        return DataLoader(
            dataset,
            batch_size=h.batch_size if train else h.eval_batch_size,
            shuffle=train,
            sampler=sampler,
            drop_last=train,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(h.seed) if train else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def eval_dataloader(self, split: str = "val", shard: bool = True) -> DataLoader:
        """The val or test loader; ``shard=False`` gives the whole split on any rank (one-process evaluation)."""
        if split not in ("val", "test"):
            raise ValueError(f"split={split!r} must be 'val' or 'test'")
        return self._loader(split, False, shard=shard)
