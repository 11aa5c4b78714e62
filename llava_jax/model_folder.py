"""The llava_jax model folder: the one path that generation, chat, evaluation and training start from.

Layout:
  config.json   {"format": "llava_jax", "version": 1, "model": ModelConfig.to_dict(), ...extra}
  params/       orbax checkpoint of the parameter tree (`nnx.State.to_pure_dict()` of a LlavaModel)
  tokenizer files (tokenizer.json / tokenizer.model / tokenizer_config.json ...), when known

A folder is written into a temporary sibling and renamed at the end, so a failed save never leaves a
half-written model folder. Saving and loading are multi-host safe: every process calls them, orbax writes and
reads each process' shards, and process 0 alone writes the small files and renames.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from llava_jax import sharding as sharding_lib
from llava_jax.models.config import ModelConfig, RuntimeConfig
from llava_jax.models.llava import LlavaModel

FORMAT, VERSION = "llava_jax", 1
CONFIG_FILE, PARAMS_DIR = "config.json", "params"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "vocab.json", "merges.txt")


class ModelFolderError(ValueError):
  """A model folder that is missing, incomplete or does not match its config (names the folder)."""


# --- Saving ----------------------------------------------------------------------------------------------------------


def save_model_folder(path: str | os.PathLike, cfg: ModelConfig, params: Any, *, tokenizer: Any = None,
                      tokenizer_source_dir: str | os.PathLike | None = None, extra: dict | None = None,
                      overwrite: bool = False) -> None:
  """Writes a model folder at `path`.

  Args:
    path: the folder to create (its parent must exist).
    cfg: the model's settings.
    params: the LlavaModel parameters: an nnx.State or a nested dict (as `to_pure_dict()` gives) of numpy arrays
      or (possibly sharded, multi-host) jax arrays; dtypes are kept as given.
    tokenizer: a transformers tokenizer to save with `save_pretrained`; or
    tokenizer_source_dir: a folder whose tokenizer files (TOKENIZER_FILES) are copied unchanged.
    extra: more top-level entries for config.json (e.g. where the weights came from).
    overwrite: replace an existing folder (the old one is removed only after the new one is complete).
  Raises:
    ModelFolderError: `path` exists (without `overwrite`), or params do not fit `cfg`.
  """
  if tokenizer is not None and tokenizer_source_dir is not None:
    raise ValueError("give tokenizer or tokenizer_source_dir, not both")
  path = absolute_path(path)
  if path.exists() and not overwrite:
    raise ModelFolderError(f"{path} already exists (pass overwrite=True / --overwrite to replace it)")
  extra = dict(extra or {})
  clash = {"format", "version", "model"} & set(extra)
  if clash:
    raise ValueError(f"extra may not set {sorted(clash)}")
  tree = _pure(params)
  check_params(tree, abstract_params(cfg, RuntimeConfig()), str(path), check_dtype=False)

  primary = jax.process_index() == 0
  tmp = path.parent / f".{path.name}.tmp"  # the same name on every process
  if primary:
    if tmp.exists():
      tmp.rmtree()
    tmp.mkdir()
  _sync("llava_jax_save_start")
  try:
    # No zstd compression: it holds a compressed copy of every chunk in flight (~ the whole tree) and is slow,
    # for a few percent of disk on weights.
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=_no_copy_registry(), use_compression=False)
    with ocp.Checkpointer(handler) as checkpointer:
      checkpointer.save(tmp / PARAMS_DIR, args=ocp.args.PyTreeSave(tree))
    if primary:
      _write_tokenizer(tmp, tokenizer, tokenizer_source_dir)
      config = {"format": FORMAT, "version": VERSION, "model": cfg.to_dict(), **extra}
      (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    _sync("llava_jax_save_written")
  except BaseException:
    if primary and tmp.exists():
      tmp.rmtree()
    raise
  if primary:
    old = path.parent / f".{path.name}.old"
    if path.exists():
      if old.exists():
        old.rmtree()
      path.rename(old)
    tmp.rename(path)
    if old.exists():
      old.rmtree()
  _sync("llava_jax_save_done")


def _no_copy_registry():
  """orbax's handlers, except that numpy arrays are written without the defensive deep copy orbax makes by
  default (which doubles peak memory when converting); the save is synchronous, so nothing mutates them."""
  handlers = ocp.type_handlers
  return handlers.create_type_handler_registry(
      (np.ndarray, handlers.NumpyHandler(deepcopy_host_arrays=False)),
      *[(t, handlers.get_type_handler(t)) for t in (jax.Array, int, float, np.number)])


def absolute_path(path: str | os.PathLike) -> epath.Path:
  """`path` made absolute against the working directory (orbax rejects relative paths); URLs stay as given."""
  path = epath.Path(path)
  return path if path.is_absolute() else path.absolute()


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _pure(params: Any) -> dict:
  """nnx.State / nested dict of arrays or nnx.Variables -> nested dict of arrays."""
  if isinstance(params, nnx.State):
    return params.to_pure_dict()
  if isinstance(params, Mapping):
    return {k: _pure(v) for k, v in params.items()}
  return getattr(params, "value", params)


def _write_tokenizer(folder: epath.Path, tokenizer: Any, source_dir: str | os.PathLike | None) -> None:
  if tokenizer is not None:
    with tempfile.TemporaryDirectory() as local:  # transformers writes local files only
      tokenizer.save_pretrained(local)
      for name in os.listdir(local):
        epath.Path(local, name).copy(folder / name)
  elif source_dir is not None:
    source = epath.Path(source_dir)
    names = [n for n in TOKENIZER_FILES if (source / n).exists()]
    if not names:
      raise ModelFolderError(f"{source}: no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})")
    for name in names:
      (source / name).copy(folder / name)


# --- Loading ---------------------------------------------------------------------------------------------------------


def read_config_json(path: str | os.PathLike) -> dict:
  """The whole config.json of a model folder (model settings and extra entries)."""
  path = epath.Path(path)
  file = path / CONFIG_FILE
  if not path.exists():
    raise ModelFolderError(f"{path}: no such model folder")
  if not file.exists():
    raise ModelFolderError(f"{path}: not a llava_jax model folder (no {CONFIG_FILE})")
  try:
    config = json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise ModelFolderError(f"{file}: invalid JSON ({e})") from e
  if config.get("format") != FORMAT:
    raise ModelFolderError(f"{file}: not a llava_jax model folder (format {config.get('format')!r}); "
                           "convert transformers checkpoints with `python -m llava_jax.convert from-hf`")
  if config.get("version") != VERSION:
    raise ModelFolderError(f"{file}: model folder version {config.get('version')!r}, this code reads {VERSION}")
  return config


def load_config(path: str | os.PathLike) -> ModelConfig:
  try:
    return ModelConfig.from_dict(read_config_json(path)["model"])
  except (KeyError, TypeError, ValueError) as e:
    if isinstance(e, ModelFolderError):
      raise
    raise ModelFolderError(f"{epath.Path(path) / CONFIG_FILE}: bad model settings ({e})") from e


def has_tokenizer(path: str | os.PathLike) -> bool:
  path = epath.Path(path)
  return any((path / n).exists() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def load_tokenizer(path: str | os.PathLike, **kwargs):
  """The folder's tokenizer through `transformers.AutoTokenizer` (kwargs are passed on)."""
  if not has_tokenizer(path):
    raise ModelFolderError(f"{path}: the model folder has no tokenizer files; give one when converting "
                           "(from-hf --tokenizer DIR) or load a tokenizer from its own folder")
  import transformers
  return transformers.AutoTokenizer.from_pretrained(str(path), **kwargs)


def abstract_model(cfg: ModelConfig, runtime: RuntimeConfig = RuntimeConfig()) -> LlavaModel:
  """A LlavaModel whose parameters are jax.ShapeDtypeStructs (nothing allocated)."""
  return nnx.eval_shape(lambda: LlavaModel(cfg, runtime, rngs=nnx.Rngs(0)))


def abstract_params(cfg: ModelConfig, runtime: RuntimeConfig = RuntimeConfig(), mesh=None) -> dict:
  """Nested dict of ShapeDtypeStructs (dtype runtime.param_dtype; with `mesh`, the partition rules' shardings)."""
  tree = nnx.state(abstract_model(cfg, runtime), nnx.Param).to_pure_dict()
  if mesh is not None:
    shardings = sharding_lib.state_shardings(tree, mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)
  return tree


def _flat(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, prefix + (str(k),)))
    else:
      out[prefix + (str(k),)] = v
  return out


def check_params(tree: Mapping, abstract: Mapping, where: str, *, check_dtype: bool = True) -> None:
  """Raises ModelFolderError listing every missing, unexpected or mis-shaped parameter of `tree`."""
  got, want = _flat(tree), _flat(abstract)
  lines = [f"  missing: {'.'.join(p)}" for p in want if p not in got]
  lines += [f"  unexpected: {'.'.join(p)}" for p in got if p not in want]
  for p in want.keys() & got.keys():
    shape, dtype = tuple(np.shape(got[p])), getattr(got[p], "dtype", None)
    if shape != tuple(want[p].shape):
      lines.append(f"  shape: {'.'.join(p)}: {shape}, the config needs {tuple(want[p].shape)}")
    elif check_dtype and dtype is not None and np.dtype(dtype) != np.dtype(want[p].dtype):
      lines.append(f"  dtype: {'.'.join(p)}: {dtype}, expected {want[p].dtype}")
  if lines:
    raise ModelFolderError(f"{where}: parameters do not match the model config:\n" + "\n".join(sorted(lines)))


def _params_dir(path: str | os.PathLike) -> epath.Path:
  params = absolute_path(path) / PARAMS_DIR
  if not params.exists():
    raise ModelFolderError(f"{path}: the model folder has no {PARAMS_DIR}/ (orbax checkpoint of the parameters)")
  return params


def saved_params_metadata(path: str | os.PathLike) -> dict:
  """Nested dict (string keys) of the saved arrays' metadata (shape, dtype)."""
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.metadata(_params_dir(path)).item_metadata.tree


def load_params(path: str | os.PathLike, abstract_state: Any, shardings: Any = None) -> dict:
  """Restores a model folder's parameters into the structure of `abstract_state`.

  Args:
    path: the model folder.
    abstract_state: nnx.State or nested dict of ShapeDtypeStructs (`abstract_params`); their dtypes are the
      target dtypes (saved arrays are cast) and their shardings, if any, the target shardings.
    shardings: optional tree of shardings (same structure) overriding those of `abstract_state`.
  Returns:
    nested dict of jax arrays (as `to_pure_dict()` gives).
  """
  target = _pure(abstract_state)
  check_params(saved_params_metadata(path), target, str(path), check_dtype=False)
  if shardings is not None:
    shardings = _pure(shardings)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, shardings)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(
      lambda a: a if getattr(a, "sharding", None) is not None else jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                                                       sharding=device), target)
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(_params_dir(path), target)


def load_numpy_params(path: str | os.PathLike, dtype: Any = None) -> dict:
  """The saved parameters as a nested dict (string keys) of host numpy arrays, in their saved dtypes or `dtype`.

  Reads on any machine whatever mesh the arrays were saved from (used by `convert to-hf`)."""
  meta = saved_params_metadata(path)
  restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype), meta)
  with ocp.PyTreeCheckpointer() as checkpointer:
    return checkpointer.restore(_params_dir(path), args=ocp.args.PyTreeRestore(restore_args=restore_args))


def load_model(path: str | os.PathLike, runtime: RuntimeConfig = RuntimeConfig(), *, mesh=None) -> LlavaModel:
  """A LlavaModel with the folder's parameters, cast to `runtime.param_dtype`; with `mesh`, sharded by the
  partition rules of `llava_jax.sharding` (each process reads its own shards)."""
  cfg = load_config(path)
  model = abstract_model(cfg, runtime)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise NotImplementedError(f"LlavaModel has non-parameter state {rest}; load_model restores parameters only")
  tree = params.to_pure_dict()
  shardings = sharding_lib.state_shardings(tree, mesh) if mesh is not None else None
  params.replace_by_pure_dict(load_params(path, tree, shardings))
  return nnx.merge(graphdef, params, rest)
