"""Device mesh, parameter partition rules and activation constraints.

The mesh has three axes: `data` (pure data parallel), `fsdp` (data parallel with parameters, gradients and
optimizer state sharded over it) and `tensor` (Megatron-style: attention heads and MLP width split). The batch is
split over ('data', 'fsdp'). Axes are `Auto`: the jitted step gets parameter/batch shardings and a few activation
constraints, and the compiler (GSPMD) propagates the rest.
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")

# First match wins; paths are our parameter paths joined with '.', stacked layer axis first.
PARTITION_RULES: list[tuple[str, P]] = [
    # LLM
    (r"language_model\.embed_tokens\.embedding", P("tensor", "fsdp")),
    (r"language_model\.layers\.self_attn\.[qkv]_proj\.kernel", P(None, "fsdp", "tensor")),
    (r"language_model\.layers\.self_attn\.[qkv]_proj\.bias", P(None, "tensor")),
    (r"language_model\.layers\.self_attn\.o_proj\.kernel", P(None, "tensor", "fsdp")),
    (r"language_model\.layers\.mlp\.(gate|up)_proj\.kernel", P(None, "fsdp", "tensor")),
    (r"language_model\.layers\.mlp\.(gate|up)_proj\.bias", P(None, "tensor")),
    (r"language_model\.layers\.mlp\.down_proj\.kernel", P(None, "tensor", "fsdp")),
    (r"language_model\.lm_head\.kernel", P("fsdp", "tensor")),
    # vision tower
    (r"vision_tower\.layers\.self_attn\.[qkv]_proj\.kernel", P(None, "fsdp", "tensor")),
    (r"vision_tower\.layers\.self_attn\.[qkv]_proj\.bias", P(None, "tensor")),
    (r"vision_tower\.layers\.self_attn\.out_proj\.kernel", P(None, "tensor", "fsdp")),
    (r"vision_tower\.layers\.fc1\.kernel", P(None, "fsdp", "tensor")),
    (r"vision_tower\.layers\.fc1\.bias", P(None, "tensor")),
    (r"vision_tower\.layers\.fc2\.kernel", P(None, "tensor", "fsdp")),
    # projector: the first Linear maps vision width -> text width, the others text -> text
    (r"projector\.linears\.\d+\.kernel", P("fsdp", "tensor")),
    (r"projector\.linears\.\d+\.bias", P("tensor")),
    (r".*", P()),  # norms, biases, embeddings of the vision tower: replicated
]


def make_mesh(shape: dict[str, int] | Sequence[int], devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
  """Mesh over `devices` (default: all) with axes data/fsdp/tensor; one size may be -1 (the rest).

  shape: {'data': d, 'fsdp': f, 'tensor': t} or (d, f, t).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = [shape.get(a, 1) for a in AXES] if isinstance(shape, dict) else list(shape)
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not split into mesh {dict(zip(AXES, sizes))}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, have {len(devices)}")
  return jax.make_mesh(tuple(sizes), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def _fit(spec: P, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> P:
  """Drops mesh axes from `spec` where they do not divide the dimension (e.g. 4 KV heads on tensor=8)."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  fitted = []
  for dim, entry in zip(shape, entries[:len(shape)]):
    names = (entry,) if isinstance(entry, str) else tuple(entry or ())
    names = tuple(n for n in names if n in mesh.shape and mesh.shape[n] > 1)
    size = math.prod(mesh.shape[n] for n in names)
    fitted.append((names[0] if len(names) == 1 else names) if names and dim % size == 0 else None)
  while fitted and fitted[-1] is None:
    fitted.pop()
  return P(*fitted)


def partition_spec(path: str, shape: tuple[int, ...], mesh: jax.sharding.Mesh,
                   rules: Sequence[tuple[str, P]] = PARTITION_RULES) -> P:
  for pattern, spec in rules:
    if re.fullmatch(pattern, path):
      return _fit(spec, shape, mesh)
  return P()


def param_name(path: tuple) -> str:
  """A jax key path of a parameter leaf -> its dotted name (e.g. 'projector.linears.0.bias'), the same for an
  nnx.State (whose leaves end in a `.value` attribute) and its pure dict."""
  parts = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path]
  return ".".join(str(p) for p in parts if p != "value")


def state_shardings(state: Any, mesh: jax.sharding.Mesh,
                    rules: Sequence[tuple[str, P]] = PARTITION_RULES) -> Any:
  """NamedShardings for every leaf of an nnx.State / nested dict of parameters (same tree structure)."""

  def one(path, leaf):
    return NamedSharding(mesh, partition_spec(param_name(path), np.shape(leaf), mesh, rules))

  return jax.tree_util.tree_map_with_path(one, state)


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh,
                rules: Sequence[tuple[str, P]] = PARTITION_RULES) -> None:
  """Places every variable of `model` on the mesh according to the rules (in place)."""
  state = nnx.state(model)
  nnx.update(model, jax.device_put(state, state_shardings(state, mesh, rules)))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
  """Batch-major arrays: first axis over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


def constrain(x: jax.Array, *spec) -> jax.Array:
  """`with_sharding_constraint` under the current mesh (`jax.set_mesh`).

  A no-op without a mesh, and for dimensions the named axes do not divide (e.g. a generation batch of 1).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(AXES) <= set(mesh.axis_names):
    return x
  return jax.lax.with_sharding_constraint(x, _fit(P(*spec), x.shape, mesh))


def constrain_batch(x: jax.Array) -> jax.Array:
  """Activations [B, ...]: batch over ('data', 'fsdp'), the rest replicated."""
  return constrain(x, BATCH, *([None] * (x.ndim - 1)))
