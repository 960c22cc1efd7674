"""Safetensors IO for state dicts: atomic writes, JSON metadata sidecars, lazy tensor-by-tensor reads.

Weights are only ever read as safetensors (never pickle / ``torch.load``): unpickling an untrusted
checkpoint runs arbitrary code, and pickled modules break across open_clip / torch versions.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = [
    "MergeInputError",
    "SafetensorsReader",
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


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


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
    if not os.access(probe, os.W_OK | os.X_OK):
        raise error(f"{flag} {path} is not writable ({probe} refuses writes); pass another {flag}")


def metadata_path(path: str | os.PathLike) -> Path:
    """Sidecar JSON path: ``model.safetensors`` -> ``model.json`` (other names get ``.json`` appended)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return path.with_suffix(".json")
    return path.with_name(path.name + ".json")


def _atomic_write(path: Path, write) -> None:
    """Run ``write(tmp_path)`` on a temp file in the same directory, fsync, then ``os.replace``.

    Same directory so that the rename stays on one filesystem and is atomic: readers see the old
    file or the new one, never a half-written one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_state_dict(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write ``state_dict`` as safetensors at ``path`` atomically, with optional JSON metadata.

    Metadata goes to the sidecar ``metadata_path(path)`` and, as one JSON string under the header key
    ``"badmerging"``, into the safetensors header, so the file stays self-describing when copied
    alone. With ``metadata=None`` a stale sidecar is removed, so it can never describe other weights.
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

    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))
    sidecar = metadata_path(path)
    if metadata_json is not None:
        def write_json(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as handle:
                handle.write(metadata_json + "\n")
        _atomic_write(sidecar, write_json)
    elif sidecar.exists():
        sidecar.unlink()


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
        if not self.path.is_file():
            raise MergeInputError(f"{self.path}: file not found; check the path (weights must be .safetensors)")
        self._entries, self._header_metadata, self._data_start = self._read_header()
        self._fd = os.open(self.path, os.O_RDONLY)

    # -- header -------------------------------------------------------------------------------
    def _fail(self, reason: str) -> MergeInputError:
        return MergeInputError(f"{self.path}: {reason}")

    def _read_header(self):
        size = self.path.stat().st_size
        with open(self.path, "rb") as handle:
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
