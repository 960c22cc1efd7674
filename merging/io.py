"""Safetensors IO for state dicts: outputs written whole, JSON metadata sidecars, lazy tensor-by-tensor reads.

Weights are only ever read as safetensors (never pickle / ``torch.load``): unpickling an untrusted
checkpoint runs arbitrary code, and pickled modules break across open_clip / torch versions.

Outputs are written as sets (:class:`OutputSet`): a results folder (results.json + results.csv + ...), or
weights + their JSON sidecar, appear whole or not at all, under a lock that refuses a second writer.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import stat
import struct
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = [
    "MergeInputError",
    "OutputBusyError",
    "OutputClaim",
    "OutputSet",
    "SafetensorsReader",
    "check_output_path",
    "claim_outputs",
    "file_problem",
    "load_metadata",
    "load_state_dict",
    "metadata_path",
    "open_state_dict",
    "read_header_metadata",
    "save_state_dict",
]

HEADER_METADATA_KEY = "badmerging"
# safetensors itself refuses headers above 100 MB; checking first avoids reading a huge "header".
_MAX_HEADER_BYTES = 100_000_000

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in [("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")]:
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)


class MergeInputError(ValueError):
    """A merge input (file, key, shape, hyperparameter) is unusable; the message names it and the fix."""


class OutputBusyError(ValueError):
    """Another live process holds the lock of the same output; the message names it, its pid and the fix."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# -- inputs: regular files only ----------------------------------------------------------------------
_SPECIAL = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a readable regular file ('does not exist', 'is a directory', 'is a FIFO (named pipe),
    not a regular file', ...), or None. Only ``stat``s it: opening a FIFO would block until a writer comes."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "does not exist"
    except OSError as error:
        return f"cannot be read ({error.strerror or _one_line(error)})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory"
    kind = next((what for test, what in _SPECIAL if test(mode)), "a special file")
    return f"is {kind}, not a regular file"


def _open_regular(path: Path) -> int:
    """A read-only descriptor of the regular file ``path``; O_NONBLOCK so that a FIFO swapped in is refused, not waited on."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise MergeInputError(f"{path}: {file_problem(path) or 'is not a regular file'}; pass a .safetensors file")
    return fd


# -- outputs: where they can go ----------------------------------------------------------------------
#: kernel pseudo filesystems: they hold no files (a write fails with a raw errno, or worse, reaches a device)
_PSEUDO_FS = frozenset({"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs",
                        "pstore", "bpf", "configfs", "fusectl", "mqueue", "efivarfs", "binfmt_misc", "nsfs"})


def _mount_of(path: str | os.PathLike) -> tuple[str, str] | None:
    """(mount point, filesystem type) that holds ``path``, from /proc/self/mounts (None where that is unreadable)."""
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except OSError:
        return None
    real, best = os.path.realpath(path), None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[1])  # "\040" is a space
        if real == point or real.startswith(point.rstrip("/") + "/"):
            if best is None or len(point) >= len(best[0]):  # the deepest mount, the last one mounted on it
                best = (point, parts[2])
    return best


def check_output_path(path: str | os.PathLike, flag: str, *, is_dir: bool, error: type[Exception] = MergeInputError) -> None:
    """Refuse an output (a directory or a file) that cannot be created or written, without creating anything.

    The one writability check of the project: entry points, the experiment engine and the export callback use it.
    """
    path = Path(path)
    if path.exists():
        if is_dir and not path.is_dir():
            raise error(f"{flag} {path} is a file, not a directory; pass a directory")
        if not is_dir and path.is_dir():
            raise error(f"{flag} {path} is a directory; pass a file path such as {path / 'model.safetensors'}")
    probe = path if (is_dir and path.is_dir()) else path.parent
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise error(f"{flag} {path} cannot be created: {probe} is a file, not a directory; pass another {flag}")
    mount = _mount_of(probe)
    if mount is not None and mount[1] in _PSEUDO_FS:
        raise error(f"{flag} {path} is under {mount[0]}, a {mount[1]} kernel pseudo filesystem that holds no files; "
                    f"pass another {flag} on a disk, e.g. outputs/{path.name or 'run'}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise error(f"{flag} {path} is not writable ({probe} refuses writes); pass another {flag}")


def metadata_path(path: str | os.PathLike) -> Path:
    """Sidecar JSON path: ``model.safetensors`` -> ``model.json`` (other names get ``.json`` appended)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return path.with_suffix(".json")
    return path.with_name(path.name + ".json")


# -- outputs written whole ------------------------------------------------------------------------------------------
#: lock path -> [descriptor, depth, pid]: the output locks this process holds (re-entrant: a run claims its out_dir
#: once, and the writers inside it claim it again)
_HELD: dict[str, list] = {}
_JOURNAL = "journal.json"
#: how long a writer of weights waits for another writer of the same file (writing a big model takes a while)
EXPORT_WAIT_S = 300.0


def _lock_dir(target: Path) -> Path:
    """Where the lock and the staging folder of ``target`` live: beside it, or inside an existing folder whose parent
    refuses writes (``--out_dir /tmp`` as a user: ``/`` is not writable)."""
    parent = target.parent
    if target.is_dir() and parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):
        return target
    return parent


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def _fsync(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _plain_name(name: object) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\0" not in name


def _roll_forward(stage: Path, into: Path) -> None:
    """Finish the commit that a killed writer journaled in ``stage`` (its files were whole and synced by then), or
    drop a staging folder without a journal (the writer died before committing: ``into`` is untouched)."""
    try:
        journal = json.loads((stage / _JOURNAL).read_text(encoding="utf-8"))
        names = list(journal["moves"]) + list(journal["removes"])
        valid = Path(journal["into"]) == into and all(map(_plain_name, names))  # never follow a forged journal elsewhere
    except (OSError, ValueError, KeyError, TypeError):
        journal, valid = None, False
    new = stage / "new"
    if journal is not None and valid and new.is_dir():
        if journal.get("fresh") and not os.path.lexists(into):
            os.rename(new, into)
        else:
            for name in journal["removes"]:
                _remove(into / name)
            for name in journal["moves"]:
                if os.path.lexists(new / name):
                    both_files = (new / name).is_file() and (into / name).is_file() and not (into / name).is_symlink()
                    if os.path.lexists(into / name) and not both_files:
                        _remove(into / name)
                    os.replace(new / name, into / name)
        _fsync(into, directory=True)
    shutil.rmtree(stage, ignore_errors=True)


def _recover(target: Path, lock_dir: Path, into: Path) -> None:
    """Under the lock every staging folder of ``target`` is a dead writer's: roll each forward or drop it."""
    prefix = f".{target.name}.tmp-"
    for place in dict.fromkeys([lock_dir, target]):
        try:
            entries = [e for e in os.scandir(place) if e.name.startswith(prefix) and e.is_dir(follow_symlinks=False)]
        except OSError:  # not a folder (a file target), or unreadable
            continue
        for entry in entries:
            _roll_forward(Path(entry.path), into)


class OutputClaim:
    """This process's exclusive claim on the output ``target`` (a folder, or a file with ``is_dir=False``).

    The lock is ``<parent>/.<name>.lock`` (``flock``): beside the output, so never one of its files, and let go by
    the kernel however the process dies. It is re-entrant within a process and removed on release. Another live
    holder: :class:`OutputBusyError` at once (``wait=0``) or after ``wait`` seconds. The first claim of a process
    finishes or drops what a killed writer of ``target`` left (see :class:`OutputSet`). With a ``flag``, ``target``
    is first checked (:func:`check_output_path`) and failures name the flag.
    """

    def __init__(self, target: str | os.PathLike, flag: str | None = None, *, wait: float = 0.0,
                 error: type[Exception] = MergeInputError, is_dir: bool = True):
        if flag is not None:
            check_output_path(target, flag, is_dir=is_dir, error=error)
        self.shown = os.path.abspath(target)
        # a folder resolved (links to one folder share its lock); a file only up to its parent (a link is replaced)
        self.target = Path(os.path.realpath(target)) if is_dir else Path(os.path.realpath(Path(target).parent)) / Path(target).name
        self.flag, self.error = flag, error
        self.into = self.target if is_dir else self.target.parent
        self.dir = _lock_dir(self.target)
        self.path = self.dir / f".{self.target.name}.lock"
        self._pid, self._held, self._created = os.getpid(), False, []
        probe = self.dir
        while not probe.exists() and probe.parent != probe:
            self._created.append(probe)
            probe = probe.parent
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._acquire(wait)
        except OSError as e:
            self._remove_created()
            if flag is None:
                raise
            raise error(f"{flag} {self.shown} cannot be written ({self.dir}: {e.strerror or _one_line(e)}); "
                        f"pass another {flag}") from None
        except BaseException:
            self._remove_created()
            raise

    def _busy(self, pid: int | None) -> OutputBusyError:
        who = f"another run (pid {pid})" if pid else "another run"
        if self.flag is None:
            return OutputBusyError(f"{self.shown} is being written by {who}; wait for it or write elsewhere")
        return OutputBusyError(f"{self.flag} {self.shown} is being written by {who}; wait for it or pass another "
                               f"{self.flag}")

    def _acquire(self, wait: float) -> None:
        import fcntl

        key = str(self.path)
        held = _HELD.get(key)
        if held is not None and held[2] == os.getpid():
            held[1] += 1
            self._held = True
            return
        deadline = time.monotonic() + wait
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                os.close(fd)
                if time.monotonic() >= deadline:
                    raise self._busy(int(text) if text.isdigit() else None) from None
                time.sleep(0.05)
                continue
            except BaseException:
                os.close(fd)
                raise
            try:
                mine = os.stat(self.path)
                same = (mine.st_ino, mine.st_dev) == (os.fstat(fd).st_ino, os.fstat(fd).st_dev)
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed the file as it let go: lock the file that is there now
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            _HELD[key] = [fd, 1, os.getpid()]
            self._held = True
            break
        try:
            _recover(self.target, self.dir, self.into)
        except BaseException:
            self.release()
            raise

    def _remove_created(self) -> None:
        for folder in self._created:  # deepest first; only empty ones (a committed output keeps its parents)
            try:
                folder.rmdir()
            except OSError:
                break

    def release(self) -> None:
        """Let go (the last release of this process removes the lock file, and the parents the claim created if empty)."""
        if not self._held or os.getpid() != self._pid:
            return
        self._held = False
        key = str(self.path)
        held = _HELD.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del _HELD[key]
        try:  # removed while still locked: a waiter that opened this file sees it gone and locks the new one
            if os.stat(self.path).st_ino == os.fstat(held[0]).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(held[0])
        self._remove_created()

    def __enter__(self) -> "OutputClaim":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # interpreter shutdown: the kernel lets go of the lock anyway
            pass


def claim_outputs(target: str | os.PathLike, flag: str | None = "--out_dir", *, wait: float = 0.0,
                  error: type[Exception] = MergeInputError, is_dir: bool = True) -> OutputClaim:
    """Claim ``target`` for this run before any work (:class:`OutputClaim`); a second run is refused with one line."""
    return OutputClaim(target, flag, wait=wait, error=error, is_dir=is_dir)


class OutputSet:
    """The outputs ``names`` of the folder ``out_dir`` written as one unit: the old complete set or the new one.

        with OutputSet(out_dir, ["results.csv", "results.json"], primary="results.json") as stage:
            (stage / "results.json").write_text(...)  # each output, file or folder, is written into ``stage``

    Entering claims ``out_dir`` (:class:`OutputClaim`; ``wait`` seconds for another writer, then one line) and makes
    the staging folder ``<parent>/.<name>.tmp-<pid>-<rand>/``. A clean exit commits: the staged files are synced, a
    journal is written, then each entry is renamed into ``out_dir`` (a replaced one kept aside until the end), the
    declared names this run did not write are removed, ``primary`` comes last; a fresh ``out_dir`` is one rename of
    the staging folder. An exception in the block drops the staging folder (``out_dir`` untouched, a fresh one never
    created); one during the commit puts the old entries back. A writer killed mid-commit is rolled forward by the
    next claim of ``out_dir`` (its journal says what is left), one killed before the journal is dropped.
    ``claim_on``: claim (and stage beside) this file instead of the folder: weights and their sidecar.
    """

    def __init__(self, out_dir: str | os.PathLike, names, *, primary: str | None = None, flag: str | None = "--out_dir",
                 wait: float = 0.0, error: type[Exception] = MergeInputError, claim_on: str | os.PathLike | None = None):
        self.names = list(dict.fromkeys(names))
        if not all(map(_plain_name, self.names)) or (primary is not None and primary not in self.names):
            raise ValueError(f"OutputSet names must be plain file names including the primary, got {self.names}")
        self.out_dir, self.primary, self.flag, self.wait, self.error = out_dir, primary, flag, wait, error
        self.claim_on = claim_on
        self.claim: OutputClaim | None = None
        self.stage_dir: Path | None = None
        self._journaled = False

    def __enter__(self) -> Path:
        target = self.out_dir if self.claim_on is None else self.claim_on
        self.claim = OutputClaim(target, self.flag, wait=self.wait, error=self.error, is_dir=self.claim_on is None)
        try:
            self.into = Path(os.path.realpath(self.out_dir))
            self._clean_old_temps()
            base = self.claim.dir
            if (self.claim_on is None and self.into.is_dir() and base != self.into
                    and os.stat(base).st_dev != os.stat(self.into).st_dev):
                base = self.into  # out_dir is a mount point: stage inside, so that every rename stays on one filesystem
            self.stage_dir = base / f".{self.claim.target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
            (self.stage_dir / "new").mkdir(parents=True)
            (self.stage_dir / "old").mkdir()
        except BaseException:
            if self.stage_dir is not None:
                shutil.rmtree(self.stage_dir, ignore_errors=True)
            self.claim.release()
            raise
        return self.stage_dir / "new"

    def _clean_old_temps(self) -> None:
        """Temp files that earlier versions wrote beside each output (``.<name>.tmp<pid>``, ``.<name>.<rand>.tmp``)."""
        if not self.into.is_dir():
            return
        for entry in os.scandir(self.into):
            for name in self.names:
                rest = entry.name[len(name) + 2:] if entry.name.startswith(f".{name}.") else None
                if rest is None or entry.is_dir(follow_symlinks=False):
                    continue
                pid = re.match(r"tmp(\d+)", rest)
                if (pid and not _pid_alive(int(pid.group(1)))) or rest == "tmp" or (
                        rest.endswith(".tmp") and not rest.startswith("tmp")):
                    Path(entry.path).unlink(missing_ok=True)

    def _commit(self) -> None:
        new, old, into = self.stage_dir / "new", self.stage_dir / "old", self.into
        written = set(os.listdir(new))
        moves = [n for n in self.names if n in written] + sorted(written - set(self.names))  # undeclared: still ours
        if self.primary in written:
            moves = [n for n in moves if n != self.primary] + [self.primary]
        removes = [n for n in self.names if n not in written]
        for name in moves:
            if os.path.isdir(into / name) and not os.path.islink(into / name) and not (new / name).is_dir():
                raise self.error(f"{into / name} is a directory, where this run writes a file; move it away")
            if (new / name).is_file():
                _fsync(new / name)
        fresh = self.claim_on is None and not os.path.lexists(into)
        text = json.dumps({"into": str(into), "fresh": fresh, "moves": moves, "removes": removes})
        tmp = self.stage_dir / f"{_JOURNAL}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.stage_dir / _JOURNAL)  # the commit point: from here a killed run is rolled forward
        self._journaled = True
        if fresh:
            try:
                os.rename(new, into)
            except BaseException:
                shutil.rmtree(self.stage_dir, ignore_errors=True)  # nothing moved: the run's outputs go with it
                raise
        else:
            done: list[tuple[str, str]] = []
            try:
                for name in removes:
                    if os.path.lexists(into / name):
                        os.rename(into / name, old / name)
                        done.append(("aside", name))
                for name in moves:
                    dst = into / name
                    if os.path.lexists(dst):
                        linked = False
                        if dst.is_file() and not dst.is_symlink() and (new / name).is_file():
                            try:  # a hard link keeps the old file readable until the new one replaces it
                                os.link(dst, old / name)
                                linked = True
                            except OSError:
                                pass
                        if not linked:
                            os.rename(dst, old / name)
                        done.append(("aside", name))
                    os.replace(new / name, dst)
                    done.append(("in", name))
            except BaseException:
                self._roll_back(done)
                raise
        _fsync(into, directory=True)
        shutil.rmtree(self.stage_dir, ignore_errors=True)

    def _roll_back(self, done: list[tuple[str, str]]) -> None:
        """Undo a failed commit, newest step first; where that fails too, the journal stays for the next claim."""
        new, old, into = self.stage_dir / "new", self.stage_dir / "old", self.into
        try:
            for step, name in reversed(done):
                if step == "in":
                    os.rename(into / name, new / name)
                else:
                    os.replace(old / name, into / name)
        except OSError:
            return
        shutil.rmtree(self.stage_dir, ignore_errors=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                try:
                    self._commit()
                except BaseException:
                    if not self._journaled:  # after the journal, the commit itself rolled back (or left it to finish)
                        shutil.rmtree(self.stage_dir, ignore_errors=True)
                    raise
            else:
                shutil.rmtree(self.stage_dir, ignore_errors=True)
        finally:
            self.claim.release()


def save_state_dict(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write ``state_dict`` as safetensors at ``path``, with optional JSON metadata, as one unit with its sidecar.

    Metadata goes to the sidecar ``metadata_path(path)`` and, as one JSON string under the header key
    ``"badmerging"``, into the safetensors header, so the file stays self-describing when copied
    alone. With ``metadata=None`` a stale sidecar is removed, so it can never describe other weights.
    Both files are committed together (:class:`OutputSet` claimed on ``path``: the sidecar first, the weights last),
    so weights never exist without the sidecar written with them; a second writer of ``path`` waits its turn.
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise MergeInputError(f"{path}: value of key {key!r} is {type(value).__name__}, not a tensor; "
                                  "store non-tensor data in metadata")
        tensor = value.detach().to("cpu").contiguous()
        # safetensors refuses tensors sharing storage (tied weights); give each its own copy.
        storage = tensor.untyped_storage().data_ptr()
        if tensor.numel() and storage in seen_storages:
            tensor = tensor.clone()
        seen_storages.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor

    header: dict[str, str] = {"format": "pt"}
    metadata_json = None
    if metadata is not None:
        metadata_json = json.dumps(dict(metadata), sort_keys=True, indent=2, default=str)
        header[HEADER_METADATA_KEY] = json.dumps(dict(metadata), sort_keys=True, default=str)

    sidecar = metadata_path(path)
    for target in (path, sidecar):
        if target.is_dir():
            raise MergeInputError(f"{target} is a directory; pass a file path such as {target / 'model.safetensors'}")
    with OutputSet(path.parent, [sidecar.name, path.name], primary=path.name, flag=None, wait=EXPORT_WAIT_S,
                   claim_on=path) as stage:
        if metadata_json is not None:
            (stage / sidecar.name).write_text(metadata_json + "\n", encoding="utf-8")
        save_file(tensors, str(stage / path.name), metadata=header)


def load_metadata(path: str | os.PathLike) -> dict | None:
    """Sidecar metadata of the weights at ``path`` (``None`` when there is no sidecar)."""
    sidecar = metadata_path(path)
    if not sidecar.is_file():
        return None
    try:
        with open(sidecar, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MergeInputError(f"{sidecar}: unreadable metadata JSON ({_one_line(error)}); "
                              "re-export the model with save_state_dict") from None
    if not isinstance(data, dict):
        raise MergeInputError(f"{sidecar}: metadata must be a JSON object; re-export the model")
    return data


def read_header_metadata(path: str | os.PathLike) -> dict | None:
    """The metadata copy stored in the safetensors header (``None`` if the file has none)."""
    with SafetensorsReader(path) as reader:
        raw = (reader.header_metadata() or {}).get(HEADER_METADATA_KEY)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as error:
        raise MergeInputError(f"{path}: header metadata is not JSON ({_one_line(error)}); "
                              "re-export the model") from None


def _declared_data_end(raw: bytes) -> int | None:
    """Largest end offset the header declares for its tensor data (None when the header is not plain JSON)."""
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(header, dict):
        return None
    ends = [info["data_offsets"][1] for key, info in header.items()
            if key != "__metadata__" and isinstance(info, dict) and isinstance(info.get("data_offsets"), list)
            and len(info["data_offsets"]) == 2 and isinstance(info["data_offsets"][1], int)]
    return max(ends, default=0)


class SafetensorsReader:
    """Lazy, context-managed reader of one safetensors file, one tensor (or flat slice) at a time.

    The header is validated by ``safetensors.safe_open`` and by an own bounds check; tensor bytes are
    then read with ``os.preadv`` into fresh buffers. Unlike a ``safe_open`` handle (an mmap of the
    whole file) this keeps no file pages resident in the process: reading every tensor of n files
    through open mmaps would grow the resident set to n models, defeating streaming merges.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = None
        problem = file_problem(self.path)
        if problem == "does not exist":
            raise MergeInputError(f"{self.path}: file not found; check the path (weights must be .safetensors)")
        if problem is not None:  # a FIFO, /dev/zero, a folder: never opened (reading a FIFO waits for a writer)
            raise MergeInputError(f"{self.path}: {problem}; pass a .safetensors file")
        fd = _open_regular(self.path)
        try:
            self._entries, self._header_metadata, self._data_start = self._read_header(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    # -- header -------------------------------------------------------------------------------
    def _fail(self, reason: str) -> MergeInputError:
        return MergeInputError(f"{self.path}: {reason}")

    def _read_header(self, fd: int):
        size = os.fstat(fd).st_size
        with os.fdopen(os.dup(fd), "rb") as handle:
            head = handle.read(9)
            # A pickle starts with PROTO (0x80, protocol 2-5); a safetensors header length's low byte may be
            # 0x80 too, so a file counts as a pickle only when it is not a plausible safetensors header.
            n_header = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
            plausible = len(head) == 9 and head[8:9] == b"{" and 8 + n_header <= size
            if not plausible and ((head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))
                                  or head[:4] == b"PK\x03\x04"):
                raise self._fail("looks like a pickle / torch.save checkpoint, which is refused (unpickling "
                                 "runs code); convert it to safetensors with trusted code")
            if len(head) < 8:
                raise self._fail(f"truncated ({size} bytes), not a safetensors file; re-export it")
            (header_len,) = struct.unpack("<Q", head[:8])
            handle.seek(8)
            if header_len > min(_MAX_HEADER_BYTES, size - 8):
                raise self._fail(f"corrupt or truncated safetensors header (claims {header_len} bytes, file "
                                 f"has {size}); re-export it")
            raw = handle.read(header_len)
        needed = _declared_data_end(raw)
        if needed is not None and 8 + header_len + needed > size:
            raise self._fail(f"truncated: its header describes {8 + header_len + needed} bytes, the file has {size}; "
                             "copy or re-export it again")
        # Let the reference parser validate too (dtypes, offsets, overlaps, buffer length).
        try:
            with safe_open(str(self.path), framework="pt") as checked:
                checked.keys()
        except Exception as error:  # safetensors raises its own SafetensorError and others
            raise self._fail(f"not a valid safetensors file ({_one_line(error)}); re-export it") from None
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise self._fail(f"corrupt safetensors header ({_one_line(error)}); re-export it") from None
        header_metadata = header.pop("__metadata__", None)
        data_start = 8 + header_len
        entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            dtype = _DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise self._fail(f"key {key!r} has unsupported dtype {info.get('dtype')!r}")
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
            numel = 1
            for s in shape:
                numel *= s
            itemsize = torch.empty((), dtype=dtype).element_size()
            if end - begin != numel * itemsize or data_start + end > size:
                raise self._fail(f"key {key!r}: byte range does not match its shape or the file is truncated; "
                                 "re-export it")
            entries[key] = (dtype, shape, begin, numel)
        return entries, header_metadata, data_start

    # -- mapping-like access ----------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Keys in sorted order (as ``safe_open`` lists them)."""
        return sorted(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def _entry(self, key: str):
        try:
            return self._entries[key]
        except KeyError:
            raise self._fail(f"has no key {key!r}; check that the file holds the expected model") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key)[1]

    def dtype(self, key: str) -> torch.dtype:
        return self._entry(key)[0]

    def numel(self, key: str) -> int:
        return self._entry(key)[3]

    def header_metadata(self) -> dict[str, str] | None:
        return self._header_metadata

    def get(self, key: str) -> torch.Tensor:
        """The whole tensor ``key`` with its stored shape and dtype."""
        return self.read_flat(key).view(self.shape(key))

    def read_flat(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Elements ``[start, stop)`` of the row-major flattened tensor ``key``, as a fresh 1-D tensor."""
        if self._fd is None:
            raise self._fail("reader is closed")
        dtype, _, begin, numel = self._entry(key)
        stop = numel if stop is None else min(stop, numel)
        count = max(stop - start, 0)
        if count == 0:
            return torch.empty(0, dtype=dtype)
        itemsize = torch.empty((), dtype=dtype).element_size()
        offset = self._data_start + begin + start * itemsize
        buffer = bytearray(count * itemsize)
        view = memoryview(buffer)
        done = 0
        while done < len(buffer):
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got == 0:
                raise self._fail(f"truncated while reading key {key!r}; re-export it")
            done += got
        return torch.frombuffer(buffer, dtype=dtype)

    # -- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def open_state_dict(path: str | os.PathLike) -> SafetensorsReader:
    """Lazy reader for ``path``: ``with open_state_dict(p) as sd: sd.get(key)`` reads one tensor."""
    return SafetensorsReader(path)


def load_state_dict(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of the safetensors file ``path`` (sorted keys), moved to ``device``."""
    with SafetensorsReader(path) as reader:
        return {key: reader.get(key).to(device) for key in reader.keys()}
