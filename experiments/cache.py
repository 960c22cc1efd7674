"""One cache of artifacts, keyed by a content hash of everything that decides them, shared by every run.

Key rule (the only one in the project): ``sha256(json(recipe))[:16]`` where a recipe lists the node kind,
the text digest of every config file, the overrides (output locations excluded: they do not change numbers),
the seed (as :func:`seed_overrides`), the keys of the node's inputs, the base weights' digest and the task's
data version. The main job, sweeps and the BV analysis build their recipes with the same functions, so the
same training is trained once. An artifact lives in ``<root>/<key>/`` and is published whole (written to a
temporary sibling directory and renamed); concurrent runs take ``<root>/.locks/<key>.lock`` (filelock), so
one trains while the others wait and then find it done.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

ENGINE_VERSION = 1  # bump when a node's outputs change meaning for the same recipe


def file_digest(path: str | os.PathLike) -> str:
    return _digest(str(Path(path).resolve()), os.stat(path).st_mtime_ns, os.stat(path).st_size)


@lru_cache(maxsize=256)
def _digest(path: str, _mtime: int, _size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def recipe_key(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"engine": ENGINE_VERSION, **recipe}, sort_keys=True).encode()).hexdigest()[:16]


def seed_overrides(seed: int) -> list[str]:
    """A run's seed: the data seed (renders and shuffling order) and ``seed_everything``.

    Models start from θ_pre and draw nothing random themselves, so the data seed is what makes two seeds
    differ. Seed 0 is the configs' default and adds no arguments.
    """
    return [] if seed == 0 else ["--seed_everything", str(seed), "--data.seed", str(seed)]


def base_digest(model_name: str, pretrained: str | None) -> str:
    """The base weights: the embedded model's shipped file, a local weights file, or the open_clip tag."""
    from modeling.clip import EMBEDDED_MODEL, EMBEDDED_WEIGHTS

    if model_name == EMBEDDED_MODEL and pretrained is None:
        return file_digest(EMBEDDED_WEIGHTS) if EMBEDDED_WEIGHTS.exists() else "embedded:missing"
    if pretrained and Path(pretrained).is_file():
        return file_digest(pretrained)
    return f"{model_name}@{pretrained}"


def data_version(task: str) -> Any:
    """What identifies a task's data in a key: a synthetic task's render version, a task file's task definition."""
    from datamodules.synthetic import TASK_VERSIONS
    from datamodules.task_files import file_task_identity

    return TASK_VERSIONS[task] if task in TASK_VERSIONS else file_task_identity(task)


class ArtifactCache:
    """``<root>/<key>/``: a node's files plus ``recipe.json``; present means complete."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key

    def done(self, key: str) -> bool:
        return (self.path(key) / "recipe.json").is_file()

    def recipe(self, key: str) -> dict:
        return json.loads((self.path(key) / "recipe.json").read_text())

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        from filelock import FileLock

        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with FileLock(str(locks / f"{key}.lock")):
            yield

    def work_dir(self, key: str) -> Path:
        """Where a node's run keeps its logs and checkpoints (kept across interruptions, for resuming)."""
        path = self.root / ".work" / key
        path.mkdir(parents=True, exist_ok=True)
        return path

    def publish(self, key: str, recipe: dict, files: dict[str, Path], extra: dict | None = None) -> Path:
        """Move ``files`` (name -> path) into ``<root>/<key>/`` as one unit: a temporary sibling, then a rename."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{key}.", suffix=".tmp"))
        try:
            for name, src in files.items():
                shutil.copyfile(src, tmp / name)
            (tmp / "recipe.json").write_text(json.dumps({**recipe, **(extra or {}), "key": key}, indent=1, default=str))
            target = self.path(key)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    def clean_stale(self, key: str) -> None:
        """Temporary directories of a killed run of ``key`` (never renamed into place); call it holding the lock."""
        if self.root.is_dir():
            for tmp in self.root.glob(f".{key}.*.tmp"):
                with contextlib.suppress(OSError):
                    shutil.rmtree(tmp)
