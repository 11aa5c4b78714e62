"""Lazy, safe readers of PyTorch / transformers checkpoint files, and a sharded safetensors writer.

`open_state_dict(path)` gives a read-only `Mapping[str, np.ndarray]` over a checkpoint folder or file; a tensor
is read from disk when its key is looked up, so a caller that takes one key at a time (`loaders.load_params`)
never holds more than one source tensor. Formats, in order of preference inside a folder:
  model.safetensors | model.safetensors.index.json (+ shards) | other *.safetensors |
  pytorch_model.bin | pytorch_model.bin.index.json (+ shards) | other *.bin.
`.bin` files are only ever read with `torch.load(weights_only=True)` (memory-mapped where the file allows it):
a pickle that would build anything but tensors and plain containers is refused, and its code never runs.
"""
from __future__ import annotations

import json
import os
import pathlib
import pickle
import re
from typing import Any, Iterable, Iterator, Mapping

import ml_dtypes  # noqa: F401  registers bfloat16 with numpy: safetensors' numpy reader needs it
import numpy as np

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


class CheckpointFormatError(ValueError):
  """A checkpoint file or folder that cannot be read (names the path)."""


class UnsafeCheckpointError(CheckpointFormatError):
  """A pickle that `torch.load(weights_only=True)` refused: it would run code or build arbitrary objects."""


def open_state_dict(path: str | os.PathLike) -> "StateDictReader":
  """Lazy {key: numpy array} view of a checkpoint folder or a single .safetensors / .bin file."""
  path = pathlib.Path(path)
  if path.is_dir():
    return StateDictReader(weight_files(path))
  if not path.exists():
    raise CheckpointFormatError(f"{path}: no such file or folder")
  if path.name.endswith(".index.json"):
    return StateDictReader(_from_index(path))
  if path.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
    raise CheckpointFormatError(f"{path}: not a .safetensors, .bin or *.index.json file")
  return StateDictReader([path])


def has_weights(folder: str | os.PathLike) -> bool:
  folder = pathlib.Path(folder)
  return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")) or (folder / SAFETENSORS_INDEX).exists()


def weight_files(folder: pathlib.Path) -> list[pathlib.Path]:
  """The weight files of a transformers-style folder (see the module docstring for the order)."""
  if (folder / "model.safetensors").exists():
    return [folder / "model.safetensors"]
  if (folder / SAFETENSORS_INDEX).exists():
    return _from_index(folder / SAFETENSORS_INDEX)
  found = sorted(folder.glob("*.safetensors"))
  if found:
    return found
  if (folder / "pytorch_model.bin").exists():
    return [folder / "pytorch_model.bin"]
  if (folder / BIN_INDEX).exists():
    return _from_index(folder / BIN_INDEX)
  found = sorted(folder.glob("*.bin"))
  if found:
    return found
  raise CheckpointFormatError(
      f"{folder}: no weights found (looked for model.safetensors, {SAFETENSORS_INDEX}, *.safetensors, "
      f"pytorch_model.bin, {BIN_INDEX}, *.bin)")


def _from_index(index_path: pathlib.Path) -> list[pathlib.Path]:
  try:
    weight_map = json.loads(index_path.read_text())["weight_map"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise CheckpointFormatError(f"{index_path}: not a checkpoint index ({e!r})") from e
  files = [index_path.parent / name for name in dict.fromkeys(weight_map.values())]
  absent = [str(f) for f in files if not f.exists()]
  if absent:
    raise CheckpointFormatError(f"{index_path}: lists shard files that do not exist: {absent}")
  return files


class StateDictReader(Mapping):
  """Read-only {key: numpy array} over several weight files; each lookup reads one tensor from disk.

  A key found in two files is an error. `source(key)` names the file a key comes from.
  """

  def __init__(self, files: Iterable[pathlib.Path]):
    self.files = [pathlib.Path(f) for f in files]
    self._where: dict[str, _SafetensorsFile | _TorchFile] = {}
    for f in self.files:
      reader = _SafetensorsFile(f) if f.suffix == ".safetensors" else _TorchFile(f)
      for key in reader.keys():
        if key in self._where:
          raise CheckpointFormatError(f"key {key!r} is in both {self._where[key].path} and {f}")
        self._where[key] = reader

  def __getitem__(self, key: str) -> np.ndarray:
    return self._where[key].get(key)

  def __iter__(self) -> Iterator[str]:
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)

  def __contains__(self, key: object) -> bool:
    return key in self._where

  def source(self, key: str) -> pathlib.Path:
    return self._where[key].path

  def close(self) -> None:
    release_cache()

  def describe(self) -> str:
    if len(self.files) == 1:
      return str(self.files[0])
    return f"{len(self.files)} files in {self.files[0].parent}"


class _SafetensorsFile:
  """One .safetensors file. The file is opened per lookup: a long-lived `safe_open` keeps its memory map, and
  every page read through it would stay in the process' resident set until the end of the conversion."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    try:
      with self._open() as f:
        self._keys = list(f.keys())
    except Exception as e:  # safetensors raises its own SafetensorError for a corrupt header
      raise CheckpointFormatError(f"{path}: not a readable safetensors file ({e})") from e

  def _open(self):
    from safetensors import safe_open
    return safe_open(str(self.path), framework="np")

  def keys(self) -> list[str]:
    return self._keys

  def get(self, key: str) -> np.ndarray:
    with self._open() as f:
      return f.get_tensor(key)


class _TorchFile:
  """One pickled PyTorch file, loaded with `weights_only=True` (and `mmap=True` where the file is a zip archive,
  i.e. saved by torch >= 1.6). The loaded dict is kept until a key of another file is looked up."""
  _cache: tuple[tuple, dict] | None = None  # shared by all .bin files: at most one is held at a time

  def __init__(self, path: pathlib.Path):
    self.path = path
    self._keys = list(self._load().keys())

  def _load(self) -> dict:
    stat = self.path.stat()
    identity = (self.path.resolve(), stat.st_mtime_ns, stat.st_size)
    cache = _TorchFile._cache
    if cache is not None and cache[0] == identity:
      return cache[1]
    _TorchFile._cache = None
    state = load_torch_file(self.path)
    _TorchFile._cache = (identity, state)
    return state

  @classmethod
  def release(cls) -> None:
    cls._cache = None

  def keys(self) -> list[str]:
    return self._keys

  def get(self, key: str) -> np.ndarray:
    from llava_jax.models.loaders import to_numpy
    return to_numpy(self._load()[key])


def release_cache() -> None:
  """Drops the memory-mapped .bin file kept for the next lookup (safetensors files are never held open)."""
  _TorchFile.release()


def load_torch_file(path: str | os.PathLike) -> dict[str, Any]:
  """{key: torch.Tensor} from a .bin file, with `torch.load(weights_only=True)` only.

  Raises:
    UnsafeCheckpointError: the pickle references anything but tensors and plain containers (its code never runs).
    CheckpointFormatError: unreadable, or not a flat dict of tensors.
  """
  import torch
  path = pathlib.Path(path)
  try:
    try:
      state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
      if "mmap" not in str(e):
        raise
      state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format: no mmap
  except pickle.UnpicklingError as e:
    raise _refusal(path, str(e)) from None
  except Exception as e:
    raise CheckpointFormatError(f"{path}: cannot read as a PyTorch checkpoint ({type(e).__name__}: {e})") from e
  if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
    kind = type(state).__name__ if not isinstance(state, dict) else "a dict holding non-tensor values"
    raise CheckpointFormatError(f"{path}: expected a flat dict of tensors (a state dict), found {kind}")
  return state


# torch >= 2.6: "Trying to load unsupported GLOBAL posix.system whose module posix is blocked."; for other classes
# (and older torch): "Unsupported global: GLOBAL argparse.Namespace was not an allowed global by default."
_BLOCKED_GLOBAL = re.compile(r"(?i)unsupported global:? (?:GLOBAL )?([\w.]+)")
_UNPICKLER_ERROR = re.compile(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", re.DOTALL)


def _refusal(path: pathlib.Path, message: str) -> CheckpointFormatError:
  """The error for a `torch.load(weights_only=True)` UnpicklingError, without torch's advice to load the file with
  weights_only=False: UnsafeCheckpointError when the pickle names a blocked global (it would import and call it),
  else CheckpointFormatError (the bytes are not a pickle that torch's restricted unpickler can read)."""
  blocked = _BLOCKED_GLOBAL.search(message)
  if blocked:
    return UnsafeCheckpointError(
        f"{path}: refused to load: torch.load(weights_only=True) found a pickle that is not a plain state dict "
        f"(it references {blocked.group(1)}). Such a file can run code when unpickled; nothing from it was "
        "executed. Get a .safetensors copy of these weights instead.")
  detail = _UNPICKLER_ERROR.search(message)
  detail = re.sub(r"\s+", " ", detail.group(1)) if detail else "not a pickled state dict"
  return CheckpointFormatError(f"{path}: cannot read as a PyTorch checkpoint ({detail}); the file is corrupt or "
                               "not a torch.save file")


# --- Writing ---------------------------------------------------------------------------------------------------------


def parse_size(text: str | int) -> int:
  """'5GB' / '500MB' / '200KB' / '1000' -> bytes (decimal units, as transformers' max_shard_size)."""
  if isinstance(text, int):
    return text
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
  if not m:
    raise ValueError(f"not a size: {text!r} (e.g. 5GB, 500MB, 1000)")
  unit = (m.group(2) or "B").upper()
  scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
           "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
  return int(float(m.group(1)) * scale)


def write_sharded_safetensors(tensors: Iterable[tuple[str, np.ndarray]], folder: str | os.PathLike, *,
                              max_shard_bytes: int, prefix: str = "model",
                              metadata: dict[str, str] | None = None) -> list[str]:
  """Writes (key, array) pairs as transformers does: `model.safetensors`, or, when they exceed one shard,
  `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`. Holds at most one shard in memory.

  Returns the file names written.
  """
  from safetensors.numpy import save_file
  folder = pathlib.Path(folder)
  metadata = {"format": "pt", **(metadata or {})}
  shard: dict[str, np.ndarray] = {}
  shard_bytes, total_bytes, parts, weight_map = 0, 0, [], {}

  def flush():
    nonlocal shard, shard_bytes
    name = f"{prefix}.part{len(parts):05d}.safetensors"
    save_file(shard, str(folder / name), metadata=metadata)
    parts.append((name, list(shard)))
    shard, shard_bytes = {}, 0

  for key, array in tensors:
    if key in weight_map or key in shard:
      raise ValueError(f"tensor {key!r} written twice")
    if shard and shard_bytes + array.nbytes > max_shard_bytes:
      flush()
    shard[key] = np.ascontiguousarray(array)
    shard_bytes += array.nbytes
    total_bytes += array.nbytes
    weight_map[key] = None
  if shard or not parts:
    flush()
  if len(parts) == 1:
    os.replace(folder / parts[0][0], folder / f"{prefix}.safetensors")
    return [f"{prefix}.safetensors"]
  names = []
  for i, (part, keys) in enumerate(parts):
    name = f"{prefix}-{i + 1:05d}-of-{len(parts):05d}.safetensors"
    os.replace(folder / part, folder / name)
    names.append(name)
    weight_map.update({k: name for k in keys})
  index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
  (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
  return names + [f"{prefix}.safetensors.index.json"]
