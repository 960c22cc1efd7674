"""A train loader whose data order survives a checkpoint: resumed mid-epoch it yields the same batches.

Lightning stores a loader's ``state_dict()`` in every checkpoint and hands it back to ``load_state_dict`` on
resume. ``make_resumable`` turns a plain shuffled (or sequential) DataLoader into one that has them: on one
device the generator state at the start of the epoch plus the batches done; under DDP the epoch (through
``set_epoch``) plus the batches done of this rank's shard. ``ResumableTaskDataModule`` is the project's
datamodule with its fit-time train loader made resumable this way (what ``train.py`` trains on).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler

from datamodules.datamodule import TaskDataModule

__all__ = ["ResumableBatchSampler", "ResumableDataLoader", "ResumableDistributedSampler", "ResumableDistributedDataLoader",
           "make_resumable", "ResumableTaskDataModule"]


class ResumableBatchSampler(BatchSampler):
    """A BatchSampler whose next iteration can resume a checkpointed position in the data order.

    The generator state is recorded when an iteration starts, right before the sampler draws its
    permutation (after the DataLoader drew its base seed). Resuming restores it and skips the batches
    already trained on (drawn as indices only, never loaded); resuming after a completed epoch replays
    that epoch's draws and the next iterator's base-seed draw, so the generator continues exactly as
    in an uninterrupted run.
    """

    def __init__(self, sampler, batch_size: int, drop_last: bool, generator: torch.Generator | None = None):
        super().__init__(sampler, batch_size, drop_last)
        self.generator = generator
        self.epoch_start_state: torch.Tensor | None = None
        self.pending: dict | None = None
        self.started = 0  # iterations that have begun drawing

    def _resume(self) -> int:
        state, self.pending = self.pending, None
        generator = self.generator
        if generator is not None and state.get("generator_state") is not None:
            generator.set_state(state["generator_state"])
        if state.get("replay_epoch"):
            for _ in super().__iter__():  # the finished epoch's permutation draws (and any trailing draw)
                pass
        if generator is not None and state.get("draw_base_seed"):
            torch.empty((), dtype=torch.int64).random_(generator=generator)  # as a fresh DataLoader iterator does
        return int(state.get("batches_done", 0))

    def __iter__(self):
        skip = self._resume() if self.pending is not None else 0
        self.epoch_start_state = self.generator.get_state() if self.generator is not None else None
        self.started += 1
        for index, batch in enumerate(super().__iter__()):
            if index >= skip:
                yield batch


class ResumableDataLoader(DataLoader):
    """DataLoader with ``state_dict``/``load_state_dict`` (Lightning stores it in every checkpoint).

    ``progress()`` returns how many batches of the current epoch training has consumed, or -1 once the
    epoch is complete (the trainer's count: the loader's own runs ahead by the prefetched batches).
    """

    def __init__(self, *args, progress: Callable[[], int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.progress = progress
        self.created = 0  # iterations requested (an iterator draws its first batch later)

    def __iter__(self):
        self.created += 1
        return super().__iter__()

    def state_dict(self) -> dict:
        sampler: ResumableBatchSampler = self.batch_sampler
        generator = sampler.generator
        current = generator.get_state() if generator is not None else None
        if self.created > sampler.started:
            # an iterator exists but has not drawn its permutation yet: it will draw from the current state
            return {"generator_state": current, "batches_done": 0}
        # the next epoch's iterator draws a base seed first, unless a persistent worker pool reuses its iterator
        fresh = not (self.persistent_workers and self.num_workers > 0 and self._iterator is not None)
        if sampler.epoch_start_state is None:  # nothing drawn yet
            return {"generator_state": current, "batches_done": 0, "draw_base_seed": fresh}
        done = int(self.progress()) if self.progress is not None else 0
        if 0 <= done < len(sampler):
            return {"generator_state": sampler.epoch_start_state, "batches_done": done}
        return {"generator_state": sampler.epoch_start_state, "batches_done": 0, "replay_epoch": True,
                "draw_base_seed": fresh}

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.pending = dict(state)


class ResumableDistributedSampler(DistributedSampler):
    """torch's DistributedSampler (the shard and the padding Lightning's own gives training) whose next
    iteration can start after the samples already trained on in this epoch.

    The permutation depends only on ``seed`` and the epoch (Lightning calls ``set_epoch``), so a resumed
    rank rebuilds it and skips ``skip`` indices; the samplers of all ranks stay in step.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip = 0  # indices to skip at the next iteration (set by a resume)

    def __iter__(self):
        skip, self.skip = self.skip, 0
        indices = list(super().__iter__())
        return iter(indices[skip:])


class ResumableDistributedDataLoader(DataLoader):
    """A DataLoader over a ``ResumableDistributedSampler`` with ``state_dict``/``load_state_dict``.

    The state is the number of batches of the current epoch that training consumed (``progress()``, as
    for ``ResumableDataLoader``); the epoch itself comes back through Lightning's ``set_epoch``.
    """

    def __init__(self, *args, progress: Callable[[], int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict:
        done = int(self.progress()) if self.progress is not None else 0
        return {"epoch": int(self.sampler.epoch), "batches_done": max(done, 0)}  # -1: epoch complete, skip none

    def load_state_dict(self, state: dict) -> None:
        self.sampler.skip = int(state.get("batches_done", 0)) * int(self.batch_size)


def make_resumable(loader: Any, progress: Callable[[], int] | None, world_size: int = 1, rank: int = 0) -> Any:
    """``loader`` as a ResumableDataLoader with the same batches in the same order, or unchanged.

    Only plain map-style DataLoaders with a Sequential or RandomSampler (without replacement) whose
    generator is the loader's own are converted; anything else is returned as it is. With
    ``world_size`` > 1 the result reads this rank's shard through a ``ResumableDistributedSampler``
    (shuffled with the loader's generator seed when the loader shuffles), so Lightning keeps it.
    """
    if type(loader) is not DataLoader or isinstance(loader.dataset, IterableDataset):
        return loader
    batch_sampler, sampler = loader.batch_sampler, loader.sampler
    if type(batch_sampler) is not BatchSampler or loader.batch_size is None:
        return loader
    if isinstance(sampler, RandomSampler):
        if sampler.replacement or sampler.generator is None or sampler.generator is not loader.generator \
                or sampler._num_samples is not None:
            return loader
    elif not isinstance(sampler, SequentialSampler):
        return loader
    kwargs = dict(num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                  timeout=loader.timeout, worker_init_fn=loader.worker_init_fn, generator=loader.generator,
                  persistent_workers=loader.persistent_workers, pin_memory_device=loader.pin_memory_device)
    if loader.num_workers > 0:
        kwargs.update(prefetch_factor=loader.prefetch_factor, multiprocessing_context=loader.multiprocessing_context)
    if world_size > 1:
        seed = int(loader.generator.initial_seed()) if loader.generator is not None else 0
        shard = ResumableDistributedSampler(loader.dataset, num_replicas=world_size, rank=rank,
                                            shuffle=isinstance(sampler, RandomSampler), seed=seed)
        return ResumableDistributedDataLoader(loader.dataset, batch_size=loader.batch_size, sampler=shard,
                                              drop_last=loader.drop_last, progress=progress, **kwargs)
    resumable = ResumableBatchSampler(sampler, loader.batch_size, loader.drop_last, generator=loader.generator)
    return ResumableDataLoader(loader.dataset, batch_sampler=resumable, progress=progress, **kwargs)


class ResumableTaskDataModule(TaskDataModule):
    """``TaskDataModule`` whose train loader, under a fitting trainer, resumes mid-epoch (``make_resumable``).

    Called after the DDP launch, so world size and rank are this process's. With ``overfit_batches`` Lightning
    replaces the sampler itself, so the loader is left as it is.
    """

    def train_dataloader(self) -> DataLoader:
        loader = super().train_dataloader()
        trainer = self.trainer
        if trainer is None or trainer.overfit_batches:
            return loader

        def progress() -> int:
            """Batches of this epoch that training has processed; -1 once the epoch is complete."""
            done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            return done if done < trainer.num_training_batches else -1

        return make_resumable(loader, progress, trainer.world_size, trainer.global_rank)
