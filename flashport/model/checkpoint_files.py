"""Finding and opening a checkpoint's safetensors shards, with errors that name the file.

Only safetensors are read: pickle formats (`*.bin`, `*.pt`, ...) can run code when loaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from flashport.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class Shard:
    path: Path
    names: tuple[str, ...] | None  # tensors the index assigns to this file; None: every tensor in it


def find_shards(model_dir: str | Path) -> tuple[list[Shard], Path]:
    """The shards to read and the file that lists them (the index, or the single shard)."""
    d = Path(model_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a directory (expected a model directory with config.json and "
                              "*.safetensors)")
    index = d / INDEX_NAME
    if not index.exists():
        others = sorted(d.glob("*.safetensors.index.json"))
        index = others[0] if len(others) == 1 else index
    if index.exists():
        return _shards_from_index(index), index
    files = sorted(d.glob("*.safetensors"))
    if files:
        return [Shard(p, None) for p in files], files[0] if len(files) == 1 else d
    pickles = sorted(p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{d}: found only pickle checkpoint files ({', '.join(pickles[:5])}); flashport loads only "
            "safetensors (pickle files can run arbitrary code when loaded). Convert the checkpoint to "
            "*.safetensors first.")
    raise CheckpointError(f"{d}: no {INDEX_NAME} and no *.safetensors file: no weights to load "
                          "(use load_format='dummy' for random weights)")


def _shards_from_index(index: Path) -> list[Shard]:
    try:
        raw: Any = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index}: cannot read the index ({e})") from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: expected an object with a 'weight_map' of tensor name -> file name")
    by_file: dict[str, list[str]] = {}
    for name, fname in weight_map.items():
        by_file.setdefault(fname, []).append(name)
    shards = []
    for fname in sorted(by_file):
        path = index.parent / fname
        if not path.is_file():
            names = by_file[fname]
            raise CheckpointError(
                f"{index}: weight_map points at shard '{fname}' (for {len(names)} tensors, e.g. '{names[0]}'), "
                f"but {path} does not exist")
        shards.append(Shard(path, tuple(by_file[fname])))
    return shards


@contextmanager
def open_shard(path: Path) -> Iterator[Any]:
    """safe_open on CPU; a truncated or corrupt file raises CheckpointError naming it."""
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    with handle as f:
        yield f


def tensor_info(f: Any, path: Path, name: str) -> tuple[str, tuple[int, ...]]:
    """(safetensors dtype string such as 'F8_E4M3', shape) without reading the data."""
    try:
        sl = f.get_slice(name)
        return sl.get_dtype(), tuple(sl.get_shape())
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the header of tensor '{name}': {e}") from None


def read_tensor(f: Any, path: Path, name: str) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot read tensor '{name}': {e}") from None
