"""Memory planner: the sharded train step compiled for a target mesh without weights, and its bytes per device.

    python -m llava_jax.main --config=configs/stage2.py:llava-v1.5-7b --dry_run --plan_devices=8 \\
        --plan_device_memory_gib=80

The model is built with `nnx.eval_shape` (shapes only), split into trainable / frozen parts as the trainer does,
placed by the partition rules of `llava_jax.sharding` on the config's mesh (-1 filled for the target device
count), the optimizer state comes from `jax.eval_shape(tx.init)` placed like the trainer's, and
`jax.jit(make_train_step(...))` is lowered and compiled with the trainer's shardings and donation for a global
micro-batch of the config's shape (batch_size / accum_steps rows of data.max_length positions, one image per row).
With --plan_devices the step is compiled for that many fake CPU devices (set before JAX starts its backends);
the compiler's temporary buffers are then those of XLA:CPU, which only approximate TPU's and GPU's (other
fusion, layout and bf16 handling), while parameter, gradient and optimizer bytes are exact.

The model shapes come from the init model folder's config.json when it exists, else from `config.model`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from llava_jax import model_folder, sharding
from llava_jax.models.config import ModelConfig, RuntimeConfig
from llava_jax.models.llava import LlavaModel
from llava_jax.train import optim, trainer
from llava_jax.train.step import TrainState, make_train_step

_PLAN_DEVICES = flags.DEFINE_integer(
    "plan_devices", 0, "--dry_run: compile for this many devices (fake CPU devices); 0 = this machine's devices.")
_PLAN_DEVICE_MEMORY_GIB = flags.DEFINE_float(
    "plan_device_memory_gib", 0.0, "--dry_run: memory of one target device in GiB, for the verdict (0: none).")
_PLAN_JSON = flags.DEFINE_string("plan_json", None, "--dry_run: also write the plan (bytes) to this JSON file.")

GIB = 1024**3


@dataclasses.dataclass
class Plan:
  """Bytes per device of one training step (the largest shard where shards differ)."""
  num_devices: int
  mesh: dict[str, int]
  micro_batch: dict[str, tuple[int, ...]]  # global shapes of one step's batch arrays
  trainable_params: int
  frozen_params: int
  optimizer_state: int
  gradients: int  # trainable parameters' shards in the parameter dtype (live inside the step: part of temp)
  batch: int
  compiled_arguments: int  # the compiler's figures for the per-device program
  compiled_outputs: int
  compiled_aliased: int  # outputs written into donated arguments
  compiled_temp: int
  compile_seconds: float
  platform: str

  @property
  def peak(self) -> int:
    """Live bytes at the step's peak: arguments + temporaries + outputs not written in place."""
    return self.compiled_arguments + self.compiled_temp + self.compiled_outputs - self.compiled_aliased


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """The init model folder's settings when it exists, else `config.model`."""
  if config.init_model and os.path.isfile(os.path.join(config.init_model, model_folder.CONFIG_FILE)):
    return model_folder.load_config(config.init_model)
  return ModelConfig.from_dict(config.model.to_dict())


def per_device_bytes(tree: Any) -> int:
  """Sum over leaves (ShapeDtypeStructs or arrays with NamedShardings) of the largest shard's bytes."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def _placed(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def abstract_train_inputs(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """(graphdef, tx, schedule, state, frozen, batch): the train step's arguments as sharded ShapeDtypeStructs."""
  cfg = model_config(config)
  runtime = RuntimeConfig(**config.runtime.to_dict())
  model = nnx.eval_shape(lambda: LlavaModel(cfg, runtime, rngs=nnx.Rngs(0)))
  parts = tuple(config.trainable) if config.trainable else optim.STAGE_TRAINABLE[config.stage]
  graphdef, trainable, frozen = nnx.split(model, optim.trainable_filter(parts), ...)
  trainable = _placed(trainable, sharding.state_shardings(trainable, mesh))
  frozen = _placed(frozen, sharding.state_shardings(frozen, mesh))
  steps = config.num_train_steps if config.num_train_steps > 0 else 1000  # the schedule's length: no bytes
  tx, schedule = optim.make_optimizer(config.optim, steps)
  param_shardings = jax.tree.map(lambda x: x.sharding, trainable)
  opt_shapes = jax.eval_shape(tx.init, trainable)
  opt_shardings = trainer.optimizer_state_shardings(tx, trainable, param_shardings, mesh)
  replicated = NamedSharding(mesh, P())
  opt_state = _placed(opt_shapes, opt_shardings)
  state = TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), trainable, opt_state)

  accum = config.accum_steps
  rows, length = config.batch_size // accum, config.data.max_length
  size = cfg.vision.image_size
  shapes = {"input_ids": ((accum, rows, length), jnp.int32), "labels": ((accum, rows, length), jnp.int32),
            "attention_mask": ((accum, rows, length), jnp.int32),
            "images": ((accum, rows, size, size, 3), jnp.float32)}  # LLaVA-1.5: one image per sample at most
  batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(
      mesh, sharding._fit(P(None, sharding.BATCH), shape, mesh))) for k, (shape, dtype) in shapes.items()}
  return graphdef, tx, schedule, state, frozen, batch


def plan(config: ml_collections.ConfigDict, devices=None) -> Plan:
  """Compiles the config's train step for `devices` (default: all) and measures its bytes per device."""
  devices = list(jax.devices() if devices is None else devices)
  mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
  if config.batch_size % config.accum_steps:
    raise ValueError(f"batch_size {config.batch_size} is not a multiple of accum_steps {config.accum_steps}")
  with jax.set_mesh(mesh):
    graphdef, tx, schedule, state, frozen, batch = abstract_train_inputs(config, mesh)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    step = jax.jit(make_train_step(graphdef, tx, schedule, loss_chunk=config.loss_chunk),
                   in_shardings=(state_shardings, None, None), out_shardings=(state_shardings, None),
                   donate_argnums=(0,))
    start = time.perf_counter()
    compiled = step.lower(state, frozen, batch).compile()
    seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  return Plan(
      num_devices=len(devices), mesh=dict(mesh.shape), micro_batch={k: v.shape for k, v in batch.items()},
      trainable_params=per_device_bytes(state.params), frozen_params=per_device_bytes(frozen),
      optimizer_state=per_device_bytes(state.opt_state), gradients=per_device_bytes(state.params),
      batch=per_device_bytes(batch), compiled_arguments=int(memory.argument_size_in_bytes),
      compiled_outputs=int(memory.output_size_in_bytes), compiled_aliased=int(memory.alias_size_in_bytes),
      compiled_temp=int(memory.temp_size_in_bytes), compile_seconds=seconds, platform=devices[0].platform)


def verdict(p: Plan, device_memory_bytes: float) -> str:
  used = p.peak / device_memory_bytes
  if used <= 0.9:
    return f"fits: {used:.0%} of {device_memory_bytes / GIB:.0f} GiB"
  if used <= 1.0:
    return f"tight: {used:.0%} of {device_memory_bytes / GIB:.0f} GiB (runtimes reserve some memory)"
  return (f"does not fit: {used:.0%} of {device_memory_bytes / GIB:.0f} GiB (try runtime.remat_policy=full, "
          "more accum_steps, more devices, or bfloat16 parameters / optimizer state)")


def _size(n: float) -> str:
  for unit, scale in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
    if n >= scale:
      return f"{n / scale:8.2f} {unit}"
  return f"{n:8.0f} B  "


def format_plan(p: Plan, device_memory_bytes: float = 0.0) -> str:
  gib = _size
  batch = ", ".join(f"{k} {list(v)}" for k, v in p.micro_batch.items())
  lines = [
      f"mesh {p.mesh} on {p.num_devices} {p.platform} devices; step inputs: {batch}",
      "per device:",
      f"  trainable parameters  {gib(p.trainable_params)}",
      f"  frozen parameters     {gib(p.frozen_params)}",
      f"  optimizer state       {gib(p.optimizer_state)}",
      f"  gradients             {gib(p.gradients)}   (inside the step: counted in the temporaries)",
      f"  batch                 {gib(p.batch)}",
      f"  compiler: arguments   {gib(p.compiled_arguments)}",
      f"  compiler: temporaries {gib(p.compiled_temp)}",
      f"  compiler: outputs     {gib(p.compiled_outputs)}   ({gib(p.compiled_aliased).strip()} written in place of "
      "donated inputs)",
      f"  peak estimate         {gib(p.peak)}",
      f"compiled in {p.compile_seconds:.0f} s" + (
          "; temporaries are XLA:CPU's and only approximate TPU/GPU ones" if p.platform == "cpu" else ""),
  ]
  if device_memory_bytes:
    lines.append("verdict: " + verdict(p, device_memory_bytes))
  return "\n".join(lines)


def use_fake_cpu_devices(count: int) -> None:
  """Makes JAX start `count` CPU devices (must run before anything starts JAX's backends)."""
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    devices = jax.devices()
    if len(devices) >= count and devices[0].platform == "cpu":
      return
    raise RuntimeError(f"JAX already started with {len(devices)} {devices[0].platform} devices; plan for {count} "
                       f"in a fresh process (XLA_FLAGS=--xla_force_host_platform_device_count={count} "
                       "JAX_PLATFORMS=cpu)")
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", count)


def print_plan(config: ml_collections.ConfigDict) -> Plan:
  """`main --dry_run`: plans for --plan_devices (fake CPU devices) or this machine's devices, and prints."""
  count = _PLAN_DEVICES.value
  if count:
    use_fake_cpu_devices(count)
  devices = jax.devices()[:count] if count else jax.devices()
  result = plan(config, devices)
  memory = _PLAN_DEVICE_MEMORY_GIB.value * GIB
  print(format_plan(result, memory), flush=True)
  if _PLAN_JSON.value:
    row = dataclasses.asdict(result) | {"peak": result.peak, "device_memory_bytes": memory,
                                        "verdict": verdict(result, memory) if memory else None}
    with open(_PLAN_JSON.value, "w") as f:
      json.dump(row, f, indent=1)
  return result
