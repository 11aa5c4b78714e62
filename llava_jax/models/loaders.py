"""PyTorch / transformers state dicts <-> our Flax parameters.

Source keys are first brought to one canonical naming, whatever the layout:
  vision.<CLIP vision key without prefix>   e.g. vision.encoder.layers.3.mlp.fc1.weight
  projector.<i>.{weight,bias}               i-th Linear of the projector
  llm.<LlamaForCausalLM key>                e.g. llm.model.layers.0.self_attn.q_proj.weight, llm.lm_head.weight
Layouts recognised: original LLaVA (`model.mm_projector.*`, `model.vision_tower.vision_tower.vision_model.*`,
`model.*`, `lm_head.*`), llava-hf on disk (`vision_tower.vision_model.*`, `multi_modal_projector.linear_k.*`,
`language_model.model.*`, `language_model.lm_head.*`), llava-hf in memory in transformers 5 (`model.vision_tower.*`,
`model.multi_modal_projector.*`, `model.language_model.*`, `lm_head.*`), CLIP (`CLIPModel` with `vision_model.*`
and an ignored text tower, or a bare `CLIPVisionModel`), LLaMA (`model.*`, `lm_head.*`).

Every parameter of our model has one rule (`_RULES`) naming its canonical key(s) and the layout change (torch
Linear [out, in] -> [in, out]; conv [out, in, kh, kw] -> [kh, kw, in, out]); stacked layer parameters [L, ...]
are filled one layer at a time, so a lazy mapping (safetensors `safe_open`) is read one tensor at a time.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from flax import nnx

from llava_jax.models.llava import LlavaModel

# (our path regex, canonical key template ({i} = layer), transform name)
_RULES: list[tuple[str, str, str]] = [
    (r"vision_tower\.patch_embedding\.kernel", "vision.embeddings.patch_embedding.weight", "conv"),
    (r"vision_tower\.class_embedding", "vision.embeddings.class_embedding", "id"),
    (r"vision_tower\.position_embedding", "vision.embeddings.position_embedding.weight", "id"),
    (r"vision_tower\.(pre_layrnorm|post_layernorm)\.scale", "vision.{0}.weight", "id"),
    (r"vision_tower\.(pre_layrnorm|post_layernorm)\.bias", "vision.{0}.bias", "id"),
    (r"vision_tower\.layers\.self_attn\.(\w+)\.kernel", "vision.encoder.layers.{i}.self_attn.{0}.weight", "linear"),
    (r"vision_tower\.layers\.self_attn\.(\w+)\.bias", "vision.encoder.layers.{i}.self_attn.{0}.bias", "id"),
    (r"vision_tower\.layers\.(layer_norm\d)\.scale", "vision.encoder.layers.{i}.{0}.weight", "id"),
    (r"vision_tower\.layers\.(layer_norm\d)\.bias", "vision.encoder.layers.{i}.{0}.bias", "id"),
    (r"vision_tower\.layers\.(fc\d)\.kernel", "vision.encoder.layers.{i}.mlp.{0}.weight", "linear"),
    (r"vision_tower\.layers\.(fc\d)\.bias", "vision.encoder.layers.{i}.mlp.{0}.bias", "id"),
    (r"projector\.linears\.(\d+)\.kernel", "projector.{0}.weight", "linear"),
    (r"projector\.linears\.(\d+)\.bias", "projector.{0}.bias", "id"),
    (r"language_model\.embed_tokens\.embedding", "llm.model.embed_tokens.weight", "id"),
    (r"language_model\.layers\.(self_attn|mlp)\.(\w+)\.kernel", "llm.model.layers.{i}.{0}.{1}.weight", "linear"),
    (r"language_model\.layers\.(self_attn|mlp)\.(\w+)\.bias", "llm.model.layers.{i}.{0}.{1}.bias", "id"),
    (r"language_model\.layers\.(\w+layernorm)\.weight", "llm.model.layers.{i}.{0}.weight", "id"),
    (r"language_model\.norm\.weight", "llm.model.norm.weight", "id"),
    (r"language_model\.lm_head\.kernel", "llm.lm_head.weight", "linear"),
]

_TO_FLAX: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "id": lambda a: a,
    "linear": lambda a: a.T,
    "conv": lambda a: a.transpose(2, 3, 1, 0),
}
_TO_TORCH: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "id": lambda a: a,
    "linear": lambda a: a.T,
    "conv": lambda a: a.transpose(3, 2, 0, 1),
}

# Source keys that carry no parameter of ours (buffers, the CLIP text tower and contrastive heads).
_IGNORED = re.compile(r"(^|\.)(position_ids|inv_freq)$|^(text_model|text_projection|visual_projection|logit_scale)")


class CheckpointMismatchError(ValueError):
  """Missing, unexpected or mis-shaped checkpoint keys, all listed in one message."""


def canonical_key(key: str, kind: str) -> str | None:
  """Canonical name of a source key (see module docstring); None for keys we ignore.

  kind: 'llava' (either LLaVA layout), 'clip' or 'llama'.
  """
  if kind == "clip":
    key = re.sub(r"^(model\.)?vision_model\.", "", key)
    return None if _IGNORED.search(key) else "vision." + key
  if kind == "llama":
    return None if _IGNORED.search(key) else "llm." + key
  if kind != "llava":
    raise ValueError(f"unknown checkpoint kind {kind!r}")
  if _IGNORED.search(key):
    return None
  patterns = [
      (r"^model\.mm_projector\.(\d+)\.", lambda m: f"projector.{int(m.group(1)) // 2}."),
      (r"^model\.mm_projector\.(?=(weight|bias)$)", lambda m: "projector.0."),  # 'linear' projector: no index
      (r"^(model\.)?multi_modal_projector\.linear_(\d+)\.", lambda m: f"projector.{int(m.group(2)) - 1}."),
      (r"^model\.vision_tower\.vision_tower\.(vision_model\.)?", lambda m: "vision."),
      (r"^(model\.)?vision_tower\.(vision_model\.)?", lambda m: "vision."),
      (r"^model\.language_model\.(model\.)?", lambda m: "llm.model."),
      (r"^language_model\.model\.", lambda m: "llm.model."),
      (r"^(language_model\.)?lm_head\.", lambda m: "llm.lm_head."),
      (r"^model\.", lambda m: "llm.model."),
  ]
  for pattern, repl in patterns:
    new, n = re.subn(pattern, repl, key, count=1)
    if n:
      return None if _IGNORED.search(new) else new
  return "unknown." + key


def canonicalize(state_dict: Mapping[str, Any], kind: str) -> dict[str, str]:
  """{canonical key: source key} for every non-ignored source key."""
  out: dict[str, str] = {}
  for key in state_dict.keys():
    canon = canonical_key(key, kind)
    if canon is None:
      continue
    if canon in out:
      raise CheckpointMismatchError(f"keys {out[canon]!r} and {key!r} both map to {canon!r}")
    out[canon] = key
  return out


def _path_str(path: tuple) -> str:
  return ".".join(str(p) for p in path)


def _rule_for(path: str) -> tuple[str, str]:
  for pattern, template, transform in _RULES:
    m = re.fullmatch(pattern, path)
    if m:
      return template.replace("{i}", "{{i}}").format(*m.groups()), transform
  raise KeyError(f"no checkpoint rule for parameter {path}")


def param_shapes(model: nnx.Module) -> dict[tuple, jax.ShapeDtypeStruct]:
  """Flat {path: shape/dtype} of a (possibly abstract, from `nnx.eval_shape`) model's parameters."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {path: jax.ShapeDtypeStruct(v.value.shape, v.value.dtype) for path, v in flat}


def canonical_sources(model: nnx.Module, prefixes: tuple[str, ...] | None = None
                      ) -> Iterator[tuple[tuple, str, str, int | None]]:
  """Yields (our path, canonical key, transform, layer index or None) for each tensor of our parameters."""
  for path, spec in param_shapes(model).items():
    name = _path_str(path)
    if prefixes is not None and not name.startswith(prefixes):
      continue
    template, transform = _rule_for(name)
    if "{i}" in template:
      for i in range(spec.shape[0]):
        yield path, template.format(i=i), transform, i
    else:
      yield path, template, transform, None


def load_params(model: nnx.Module, tensors: Mapping[str, Any], *, prefixes: tuple[str, ...] | None = None,
                dtype: Any = None, allow_unused: bool = False) -> nnx.State:
  """Builds the parameter state of `model` (our paths under `prefixes`) from canonical-named tensors.

  Args:
    model: a model (abstract is fine) giving paths and shapes.
    tensors: {canonical key: array-like (numpy, torch or a lazy reader)}; read one key at a time.
    prefixes: only our parameters whose path starts with one of these (e.g. ('vision_tower.',)).
    dtype: output dtype (default: the model's parameter dtype).
    allow_unused: do not complain about canonical keys this model does not use.
  Returns:
    an nnx.State of numpy arrays for the selected parameters.
  Raises:
    CheckpointMismatchError listing every missing key, shape mismatch and unexpected key.
  """
  shapes = param_shapes(model)
  out: dict[tuple, np.ndarray] = {}
  missing, mismatched, used = [], [], set()
  for path, key, transform, layer in canonical_sources(model, prefixes):
    spec = shapes[path]
    if path not in out:
      out[path] = np.empty(spec.shape, dtype or spec.dtype)
    if key not in tensors:
      missing.append(key)
      continue
    used.add(key)
    array = _TO_FLAX[transform](to_numpy(tensors[key]))
    want = spec.shape[1:] if layer is not None else spec.shape
    if array.shape != tuple(want):
      source_shape = tuple(reversed(array.shape)) if transform == "linear" else array.shape
      mismatched.append(f"{key}: checkpoint {source_shape}, model expects {want} as {_path_str(path)}")
      continue
    if layer is None:
      out[path][...] = array
    else:
      out[path][layer] = array
  unexpected = [] if allow_unused else sorted(k for k in tensors.keys() if k not in used and (
      prefixes is None or _canonical_part(k) in _parts_of(prefixes)))
  if _TIED_HEAD in unexpected and _is_tied_copy(tensors):  # tied models may still save the head
    unexpected.remove(_TIED_HEAD)
  if missing or mismatched or unexpected:
    lines = [f"checkpoint does not match the model ({len(missing)} missing, {len(mismatched)} mis-shaped, "
             f"{len(unexpected)} unexpected):"]
    lines += [f"  missing: {k}" for k in missing]
    lines += [f"  shape: {m}" for m in mismatched]
    lines += [f"  unexpected: {k}" for k in unexpected]
    raise CheckpointMismatchError("\n".join(lines))
  return nnx.State(_nest(out))


_TIED_HEAD, _EMBED = "llm.lm_head.weight", "llm.model.embed_tokens.weight"


def _is_tied_copy(tensors: Mapping[str, Any]) -> bool:
  return _EMBED in tensors and np.array_equal(to_numpy(tensors[_TIED_HEAD]), to_numpy(tensors[_EMBED]))


_PART_OF_PREFIX = {"vision_tower": "vision", "projector": "projector", "language_model": "llm"}


def _canonical_part(key: str) -> str:
  return key.split(".", 1)[0]


def _parts_of(prefixes: tuple[str, ...]) -> set[str]:
  return {_PART_OF_PREFIX.get(p.split(".")[0], p) for p in prefixes}


def _nest(flat: dict[tuple, Any]) -> dict:
  nested: dict = {}
  for path, value in flat.items():
    node = nested
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return nested


def to_numpy(tensor: Any) -> np.ndarray:
  """numpy view of a numpy/jax/torch tensor (bf16 torch tensors go through float32)."""
  if isinstance(tensor, np.ndarray):
    return tensor
  if type(tensor).__module__.startswith("torch"):
    import torch  # torch is only needed when torch tensors are given.
    t = tensor.detach().cpu()
    if t.dtype == torch.bfloat16:
      import ml_dtypes
      return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()
  return np.asarray(tensor)


def canonical_tensors(state_dict: Mapping[str, Any], kind: str) -> "CanonicalView":
  """A lazy {canonical key: tensor} view of a state dict of the given kind (see `canonical_key`)."""
  return CanonicalView(state_dict, canonicalize(state_dict, kind))


class CanonicalView(Mapping):
  """Mapping from canonical keys to the tensors of an underlying (possibly lazy) state dict."""

  def __init__(self, source: Mapping[str, Any], names: dict[str, str]):
    self.source, self.names = source, names

  def __getitem__(self, key):
    return self.source[self.names[key]]

  def __contains__(self, key):  # Mapping's default reads the tensor
    return key in self.names

  def __iter__(self):
    return iter(self.names)

  def __len__(self):
    return len(self.names)

  def source_key(self, key: str) -> str:
    return self.names[key]


class MergedView(Mapping):
  """Several canonical views read as one; a key present in two views is an error."""

  def __init__(self, *views: Mapping[str, Any]):
    self.views, self.owner = views, {}
    for view in views:
      for key in view:
        if key in self.owner:
          raise CheckpointMismatchError(f"{key} is given by two sources")
        self.owner[key] = view

  def __getitem__(self, key):
    return self.owner[key][key]

  def __contains__(self, key):
    return key in self.owner

  def __iter__(self):
    return iter(self.owner)

  def __len__(self):
    return len(self.owner)


# --- Convenience entry points over in-memory state dicts ------------------------------------------------------------


def load_llava_state_dict(model: nnx.Module, state_dict: Mapping[str, Any], **kw) -> nnx.State:
  """Parameters of a LlavaModel from a LLaVA state dict (original or llava-hf layout)."""
  return load_params(model, canonical_tensors(state_dict, "llava"), **kw)


def load_clip_state_dict(model: nnx.Module, state_dict: Mapping[str, Any], **kw) -> nnx.State:
  """Parameters of a CLIPVisionTransformer (or the vision tower of a LlavaModel) from a CLIP state dict."""
  view = canonical_tensors(state_dict, "clip")
  if isinstance(model, LlavaModel):
    return load_params(model, view, prefixes=("vision_tower.",), **kw)
  return _strip_prefix(load_params(_Wrap(vision_tower=model), view, **kw), "vision_tower")


def load_llama_state_dict(model: nnx.Module, state_dict: Mapping[str, Any], **kw) -> nnx.State:
  """Parameters of a LlamaModel (or the LLM of a LlavaModel) from a LlamaForCausalLM state dict."""
  view = canonical_tensors(state_dict, "llama")
  if isinstance(model, LlavaModel):
    return load_params(model, view, prefixes=("language_model.",), **kw)
  return _strip_prefix(load_params(_Wrap(language_model=model), view, **kw), "language_model")


class _Wrap(nnx.Module):
  def __init__(self, **children):
    for name, child in children.items():
      setattr(self, name, child)


def _strip_prefix(state: nnx.State, name: str) -> nnx.State:
  return nnx.State(state[name])


def export_tensors(params: nnx.State | Mapping, model: nnx.Module, *, prefixes: tuple[str, ...] | None = None
                   ) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (canonical key, torch-layout numpy array) for our parameters, one tensor at a time."""
  flat = {path: v for path, v in nnx.to_flat_state(params)} if isinstance(params, nnx.State) else params
  for path, key, transform, layer in canonical_sources(model, prefixes):
    value = flat[path]
    value = np.asarray(getattr(value, "value", value))
    yield key, np.ascontiguousarray(_TO_TORCH[transform](value if layer is None else value[layer]))
