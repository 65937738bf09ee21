"""Streaming safetensors: read one tensor at a time, write files whose data is produced lazily.

The format is an 8-byte little-endian header length, a JSON header (``dtype``, ``shape``,
``data_offsets`` per tensor, optional ``__metadata__``), then the raw little-endian bytes.
We parse it ourselves so that every dtype of the released checkpoints (BF16, F8_E4M3)
reads into numpy through ``ml_dtypes`` and nothing is ever memory-mapped or held beyond
the tensor asked for. A sharded checkpoint's ``model.safetensors.index.json`` maps names
to files; without one, every ``*.safetensors`` file of the directory is read.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import ml_dtypes
import numpy as np

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
CODES = {v: k for k, v in DTYPES.items()}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointFormatError(ValueError):
    """A checkpoint directory we refuse to read (pickle only, corrupt header, ...)."""


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


def _read_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointFormatError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise CheckpointFormatError(f"{path}: not a safetensors file (header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointFormatError(f"{path}: corrupt safetensors header ({e})") from None
    return header, 8 + n


class SafetensorsReader:
    """Tensor names, shapes and dtypes of a checkpoint directory; ``read`` loads one tensor."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        if not os.path.isdir(self.directory):
            raise FileNotFoundError(f"no checkpoint directory at {self.directory}")
        self.tensors: dict[str, TensorInfo] = {}
        for fname in self._files():
            self._scan(os.path.join(self.directory, fname))

    def _files(self) -> list[str]:
        entries = os.listdir(self.directory)
        index = os.path.join(self.directory, INDEX)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map", {})
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.exists(os.path.join(self.directory, f))]
            if missing:
                raise FileNotFoundError(
                    f"{self.directory}: {INDEX} lists {len(missing)} missing file(s): "
                    f"{', '.join(missing[:5])}"
                )
            return files
        files = sorted(e for e in entries if e.endswith(".safetensors"))
        if files:
            return files
        pickles = sorted(e for e in entries if e.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise CheckpointFormatError(
                f"{self.directory} holds only pickle checkpoints ({', '.join(pickles[:3])}); "
                "we read safetensors only: unpickling can run arbitrary code and cannot be "
                "streamed tensor by tensor. Convert it once with transformers "
                "(from_pretrained(...).save_pretrained(dir, safe_serialization=True))."
            )
        raise FileNotFoundError(f"{self.directory}: no *.safetensors files (and no {INDEX})")

    def _scan(self, path: str) -> None:
        header, start = _read_header(path)
        size = os.path.getsize(path)
        for name, h in header.items():
            if name == "__metadata__":
                continue
            if h["dtype"] not in DTYPES:
                raise CheckpointFormatError(
                    f"{path}: tensor {name!r} has unsupported dtype {h['dtype']}"
                )
            b, e = h["data_offsets"]
            info = TensorInfo(path, DTYPES[h["dtype"]], tuple(h["shape"]), start + b, start + e)
            if info.end > size or (e - b) != math.prod(info.shape) * info.dtype.itemsize:
                raise CheckpointFormatError(
                    f"{path}: tensor {name!r} has inconsistent offsets (truncated file?)"
                )
            self.tensors[name] = info

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return sorted(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(
                f"tensor {name!r} is not in the checkpoint at {self.directory}"
            ) from None

    def read(self, name: str) -> np.ndarray:
        """The tensor as a numpy array of its stored dtype (a fresh copy; nothing is mapped)."""
        t = self.info(name)
        out = np.empty(t.shape, t.dtype)
        with open(t.file, "rb") as f:
            f.seek(t.begin)
            n = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        if n != t.end - t.begin:
            raise CheckpointFormatError(f"{t.file}: short read of tensor {name!r}")
        return out


# ------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def write_file(
    path: str,
    specs: list[TensorSpec],
    produce: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Writes ``specs`` in order; ``produce(name)`` is called once per tensor, just in time."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for s in specs:
        if np.dtype(s.dtype) not in CODES:
            raise ValueError(f"tensor {s.name!r}: dtype {s.dtype} has no safetensors code")
        header[s.name] = {
            "dtype": CODES[np.dtype(s.dtype)],
            "shape": list(s.shape),
            "data_offsets": [offset, offset + s.nbytes],
        }
        offset += s.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for s in specs:
            arr = np.ascontiguousarray(produce(s.name))
            if arr.shape != tuple(s.shape) or arr.dtype != np.dtype(s.dtype):
                raise ValueError(
                    f"tensor {s.name!r}: produced {arr.dtype}{list(arr.shape)}, "
                    f"declared {np.dtype(s.dtype)}{list(s.shape)}"
                )
            f.write(arr.reshape(-1).view(np.uint8).data)
    os.replace(tmp, path)


def save_sharded(
    directory: str,
    specs: Iterable[TensorSpec],
    produce: Callable[[str], np.ndarray],
    *,
    max_shard_bytes: int = 5 * 10**9,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """``model.safetensors``, or numbered shards plus ``model.safetensors.index.json``.

    Returns the file names written. Tensors keep the order of ``specs``.
    """
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if groups[-1] and size + s.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(s)
        size += s.nbytes
    os.makedirs(directory, exist_ok=True)
    for stale in os.listdir(directory):  # never mix with the shards of an earlier export
        if stale.endswith(".safetensors") or stale == INDEX:
            os.remove(os.path.join(directory, stale))
    if len(groups) == 1:
        write_file(os.path.join(directory, SINGLE), groups[0], produce, metadata)
        return [SINGLE]
    names = [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
    weight_map = {}
    for fname, group in zip(names, groups, strict=True):
        write_file(os.path.join(directory, fname), group, produce, metadata)
        weight_map.update({s.name: fname for s in group})
    total = sum(s.nbytes for g in groups for s in g)
    with open(os.path.join(directory, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names
