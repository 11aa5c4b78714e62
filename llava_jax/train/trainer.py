"""The stage-1 / stage-2 trainer: one loop over a device mesh.

    model folder (or random init) -> split trainable / frozen -> shard on the mesh
    grain batches -> global arrays -> jitted step (donated state) -> metrics, eval, checkpoints
    -> model folder (+ projector.safetensors for stage 1)

Resuming: a workdir with checkpoints restarts from the latest one (state + data iterator position), so the
loss sequence and the final parameters equal those of an uninterrupted run. SIGTERM / SIGINT save and exit.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from llava_jax import model_folder, sharding
from llava_jax.data import pipeline, records
from llava_jax.models import loaders
from llava_jax.models.config import ModelConfig, RuntimeConfig
from llava_jax.models.llava import LlavaModel
from llava_jax.train import checkpoint as ckpt_lib
from llava_jax.train import metrics as metrics_lib
from llava_jax.train import optim
from llava_jax.train.step import TrainState, make_eval_step, make_train_step


class NonFiniteLossError(RuntimeError):
  pass


@dataclasses.dataclass
class TrainResult:
  step: int
  model_dir: str | None
  losses: list[float]
  interrupted: bool = False


def build_model(config: ml_collections.ConfigDict, runtime: RuntimeConfig, mesh) -> tuple[LlavaModel, Any]:
  """The starting model (sharded on the mesh) and its tokenizer."""
  if config.init_model:
    model = model_folder.load_model(config.init_model, runtime, mesh=mesh)
    return model, model_folder.load_tokenizer(config.init_model)
  cfg = ModelConfig.from_dict(config.model.to_dict())
  model = LlavaModel(cfg, runtime, rngs=nnx.Rngs(config.seed))
  sharding.shard_model(model, mesh)
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  return model, AutoTokenizer.from_pretrained(config.tokenizer)


def data_config(config: ml_collections.ConfigDict, files: Any, *, key: str = "data.data_files", **overrides
                ) -> dict:
  """The pipeline's settings: `data` with `image_folder` (LLaVA's --image_folder) applied to plain paths.

  files: the config's `key` (see `records.config_data_files`)."""
  cfg = config.data.to_dict()
  image_folder = cfg.pop("image_folder", "")
  cfg["data_files"] = [{"path": f, "image_folder": image_folder or None} if isinstance(f, str) else dict(f)
                       for f in records.config_data_files(files, key)]
  return cfg | overrides


def pipeline_records_per_epoch(data_cfg: dict) -> int:
  """Records in one epoch of the pipeline's global order (the mixture's weighted draw, as the pipeline does)."""
  mixture = records.MixtureSource.from_files(data_cfg["data_files"])
  return len(mixture.epoch_indices(np.random.default_rng([data_cfg["seed"], 0])))


def total_train_steps(config: ml_collections.ConfigDict) -> int:
  """num_train_steps, or num_epochs of the pipeline's weighted epochs (a weight-2 file counts twice)."""
  if config.num_train_steps > 0:
    return config.num_train_steps
  num_records = pipeline_records_per_epoch(data_config(config, config.data.data_files))
  return max(1, math.floor(num_records * config.num_epochs / config.batch_size))


class BatchFeeder:
  """Turns this process's grain batches into global arrays [accum, B, ...] sharded over ('data', 'fsdp').

  image_buckets: the allowed image counts per process and micro-batch (`micro_batch_image_buckets`); the count is
    rounded up to one, so the step compiles once per bucket, not once per count. None: the largest real count.
  """

  KEYS = ("input_ids", "labels", "attention_mask", "images")

  def __init__(self, iterator, mesh, accum_steps: int, image_buckets: tuple[int, ...] | None = None):
    self.iterator, self.mesh, self.accum = iterator, mesh, accum_steps
    self.image_buckets = image_buckets
    self._reorder = {}  # images sharding -> jitted reordering (multi-process batches, see global_image_order)

  def _sharding(self, shape) -> NamedSharding:
    return NamedSharding(self.mesh, sharding._fit(P(None, sharding.BATCH), shape, self.mesh))

  def next(self, stop: bool = False) -> tuple[dict[str, jax.Array], int] | None:
    """-> (global batch, number of real token positions in this process's part), or None to stop.

    One pipeline batch of accum x B rows is split into `accum` micro-batches, so the data order (and LLaVA's
    length grouping) is the same whatever the accumulation.

    stop: this process wants to stop (a signal). All processes stop at the same step when any of them does
    (agreed with the shapes, in the same collective); the iterator is left before the batch not trained on.
    """
    if stop and jax.process_count() == 1:
      return None
    before = self.iterator.get_state() if jax.process_count() > 1 else None
    batch = next(self.iterator)
    micro = split_micro_batches(batch, self.accum)
    length = batch["input_ids"].shape[1]
    counts = np.array([m["images"].shape[0] for m in micro])  # real images of each micro-batch
    n_images = int(counts.max())
    if jax.process_count() > 1:  # every process must build the same global shapes
      gathered = multihost_utils.process_allgather(np.concatenate([[length, stop], counts]))  # [P, 2 + accum]
      if gathered[:, 1].any():
        self.iterator.set_state(before)
        return None
      length, n_images = int(gathered[:, 0].max()), int(gathered[:, 2:].max())
    if self.image_buckets is not None:
      n_images = pipeline.round_up(n_images, self.image_buckets)
    order = global_image_order(gathered[:, 2:], n_images) if jax.process_count() > 1 else None
    tokens = int(batch["num_tokens"].sum())
    proc = jax.process_count()
    out = {}
    for key in self.KEYS:
      value = np.stack([_pad_to(m[key], length, n_images, key) for m in micro])
      global_shape = (value.shape[0], value.shape[1] * proc) + value.shape[2:]
      out[key] = jax.make_array_from_process_local_data(self._sharding(global_shape), value, global_shape)
    if order is not None:
      order = jax.make_array_from_process_local_data(NamedSharding(self.mesh, P()), order)
      target = out["images"].sharding
      if target not in self._reorder:
        self._reorder[target] = jax.jit(_take_images, out_shardings=target)
      out["images"] = self._reorder[target](out["images"], order)
    return out, tokens


def micro_batch_image_buckets(data_cfg: dict, rows: int) -> tuple[int, ...]:
  """The pipeline's image buckets for a micro-batch of `rows` rows (the padding images carry no placeholder, so
  neither the splice nor the loss sees them)."""
  return pipeline.image_buckets(pipeline.make_data_config(data_cfg, batch_size=rows))


def global_image_order(counts: np.ndarray, n_images: int) -> np.ndarray | None:
  """Where each image of the global batch must come from so that `splice` finds it; None if already in place.

  Each process contributes a block of `n_images` image slots, its real images first. `splice` takes images in
  row-major placeholder order over the whole global batch, so the real images must come first, without the
  padding slots of earlier processes between them.

  Args:
    counts: int[P, accum] real images in each process's micro-batches.
    n_images: image slots per process and micro-batch.
  Returns:
    int32[accum, P * n_images]: slot k of the reordered array takes slot order[a, k] of the assembled one.
  """
  procs, accum = counts.shape
  if n_images == 0 or np.all(counts[:-1] == n_images):
    return None
  order = np.empty((accum, procs * n_images), np.int32)
  for a in range(accum):
    real = [p * n_images + j for p in range(procs) for j in range(counts[p, a])]
    padding = [p * n_images + j for p in range(procs) for j in range(counts[p, a], n_images)]
    order[a] = real + padding
  return order


def _take_images(images: jax.Array, order: jax.Array) -> jax.Array:
  """float32[accum, I, S, S, 3], int32[accum, I] -> images[a, order[a]] for each a."""
  return jax.vmap(lambda x, o: x[o])(images, order)


def split_micro_batches(batch: dict[str, np.ndarray], accum: int) -> list[dict[str, np.ndarray]]:
  """Splits a pipeline batch row-wise into `accum` micro-batches, each with its own rows' images."""
  rows = batch["input_ids"].shape[0] // accum
  ends = np.cumsum(batch["num_images"])
  out = []
  for k in range(accum):
    lo, hi = k * rows, (k + 1) * rows
    first = int(ends[lo - 1]) if lo else 0
    micro = {key: batch[key][lo:hi] for key in ("input_ids", "labels", "attention_mask")}
    micro["images"] = batch["images"][first:int(ends[hi - 1])]
    out.append(micro)
  return out


def _pad_to(array: np.ndarray, length: int, n_images: int, key: str) -> np.ndarray:
  if key == "images":
    return np.pad(array, [(0, n_images - array.shape[0])] + [(0, 0)] * 3)
  fill = {"labels": -100, "attention_mask": 0, "input_ids": 0}[key]
  return np.pad(array, [(0, 0), (0, length - array.shape[1])], constant_values=fill)


def write_outputs(workdir: str, model_cfg: ModelConfig, trainable, frozen, tokenizer, stage: int) -> str:
  """Final model folder (and, for stage 1, the projector alone in LLaVA's `model.mm_projector.*` naming)."""
  out_dir = os.path.join(workdir, "model")
  params = nnx.merge_state(trainable, frozen)
  # overwrite: a restart after the end (or after a kill in a later stage) writes the same model again.
  model_folder.save_model_folder(out_dir, model_cfg, params, tokenizer=tokenizer, overwrite=True)
  if stage == 1:
    projector = multihost_utils.process_allgather(nnx.State({"projector": params["projector"]}), tiled=True)
    if jax.process_index() == 0:
      save_projector(os.path.join(workdir, "projector.safetensors"), model_cfg, projector)
  return out_dir


def save_projector(path: str, model_cfg: ModelConfig, projector: nnx.State) -> None:
  """Writes the projector as LLaVA's stage-1 mm_projector file (safetensors, float32), whose keys LLaVA loads
  with `mm_projector.load_state_dict(get_w(weights, 'mm_projector'))`.

  projector: nnx.State {"projector": ...} of host-readable arrays.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  abstract = nnx.eval_shape(lambda: LlavaModel(model_cfg, rngs=nnx.Rngs(0)))
  tensors = {}
  for key, value in loaders.export_tensors(projector, abstract, prefixes=("projector.",)):
    _, index, kind = key.split(".")
    tensors[mm_projector_key(model_cfg.projector_type, int(index), kind)] = np.asarray(value, np.float32)
  save_file(tensors, path)


def mm_projector_key(projector_type: str, index: int, kind: str) -> str:
  """LLaVA's name of the projector's `index`-th Linear's `kind` ('weight' / 'bias'): 'linear' is one nn.Linear
  (`model.mm_projector.weight`); 'mlp{N}x_gelu' is nn.Sequential(Linear, GELU, Linear, ...), Linears at 0, 2, ..."""
  if projector_type == "linear":
    return f"model.mm_projector.{kind}"
  return f"model.mm_projector.{2 * index}.{kind}"


def train(config: ml_collections.ConfigDict, workdir: str, *, devices=None) -> TrainResult:
  """Runs one training stage in `workdir` (resuming from its latest checkpoint).

  devices: the devices of the mesh (default: all).
  """
  os.makedirs(workdir, exist_ok=True)
  runtime = RuntimeConfig(**config.runtime.to_dict())
  mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
  model, tokenizer = build_model(config, runtime, mesh)
  parts = tuple(config.trainable) if config.trainable else optim.STAGE_TRAINABLE[config.stage]
  graphdef, trainable, frozen = nnx.split(model, optim.trainable_filter(parts), ...)
  total_steps = total_train_steps(config)
  tx, schedule = optim.make_optimizer(config.optim, total_steps)
  param_shardings = sharding.state_shardings(trainable, mesh)
  opt_state = jax.jit(tx.init, out_shardings=optimizer_state_shardings(tx, trainable, param_shardings, mesh))(
      trainable)
  state = _on_mesh(TrainState(jnp.zeros((), jnp.int32), trainable, opt_state), mesh)
  frozen = _on_mesh(frozen, mesh)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)

  accum = config.accum_steps
  per_process = config.batch_size // (accum * jax.process_count())
  if per_process * accum * jax.process_count() != config.batch_size:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by accum_steps {accum} x "
                     f"{jax.process_count()} processes")
  data_cfg = data_config(config, config.data.data_files, batch_size=per_process * accum, num_epochs=None)
  iterator = pipeline.make_train_iterator(data_cfg, tokenizer, model.cfg)

  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=config.checkpoint_every,
                                       keep=config.checkpoint_keep, async_save=config.async_checkpoint)
  start = checkpointer.latest_step()
  if start is not None:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    state, data_state, _ = checkpointer.restore(
        start, abstract, records_per_epoch=lambda: pipeline_records_per_epoch(data_cfg))
    state = TrainState(*state)
    iterator.set_state(data_state)
    logging.info("resumed from %s at step %d", checkpointer.directory, start)
  start = int(state.step)

  train_step = jax.jit(make_train_step(graphdef, tx, schedule, loss_chunk=config.loss_chunk),
                       in_shardings=(state_shardings, None, None), out_shardings=(state_shardings, None),
                       donate_argnums=(0,))
  eval_step = jax.jit(make_eval_step(graphdef, loss_chunk=config.loss_chunk))
  feeder = BatchFeeder(iterator, mesh, accum, micro_batch_image_buckets(data_cfg, per_process))
  writer = metrics_lib.MetricsWriter(workdir, total_steps, start, description=f"stage {config.stage}")
  stop = {"signal": None}

  def on_signal(signum, _):
    stop["signal"] = signum

  previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
  meta = {"init_model": config.init_model, "stage": config.stage, "trainable": list(parts)}
  pending, losses, tokens_since, t_last = [], [], 0, time.perf_counter()
  step, stopped = start, False
  try:
    with jax.set_mesh(mesh):
      while step < total_steps:
        fed = feeder.next(stop=stop["signal"] is not None)
        if fed is None:  # a signal here or in another process
          stopped = True
          break
        batch, tokens = fed
        state, metrics = train_step(state, frozen, batch)
        step += 1
        tokens_since += tokens
        pending.append((step, metrics))
        at_end = step == total_steps
        if step % config.log_every == 0 or at_end or checkpointer.should_save(step):
          now = time.perf_counter()
          fetched = _check_finite(pending)
          losses.extend(float(m["loss"]) for _, m in fetched)
          last = dict(fetched[-1][1])
          last.pop("finite")
          last["tokens_per_second"] = tokens_since * jax.process_count() / max(now - t_last, 1e-9)
          writer.write(step, last)
          writer.progress(step, loss=float(last["loss"]), tok_s=round(last["tokens_per_second"]))
          pending, tokens_since, t_last = [], 0, now
        if config.eval_every > 0 and config.eval_data_files and (step % config.eval_every == 0 or at_end):
          eval_loss = evaluate(config, tokenizer, model.cfg, eval_step, state.params, frozen, mesh)
          writer.write(step, {"eval_loss": eval_loss})
          if jax.process_index() == 0:
            print(f"step {step}: eval loss {eval_loss:.4f}", file=sys.stderr)
        if checkpointer.should_save(step) or at_end:
          checkpointer.save(step, state, iterator.get_state(), meta)
      if stopped:
        _check_finite(pending)
        checkpointer.save(step, state, iterator.get_state(), meta)
        if jax.process_index() == 0:
          print(f"signal {stop['signal'] or '(in another process)'}: saved step {step} in {checkpointer.directory}; "
                "exiting", file=sys.stderr)
  finally:
    checkpointer.close()
    writer.close()
    for s, handler in previous.items():
      signal.signal(s, handler)
    if hasattr(iterator, "summary") and jax.process_index() == 0:
      print(iterator.summary(), file=sys.stderr)
  if stopped:
    return TrainResult(step, None, losses, interrupted=True)
  # The prompt a model is trained on is the prompt it is asked with: the folder records the data's template/aspect.
  trained_cfg = dataclasses.replace(model.cfg, template=config.data.template or model.cfg.template,
                                    image_aspect_ratio=config.data.aspect or model.cfg.image_aspect_ratio)
  model_dir = write_outputs(workdir, trained_cfg, state.params, frozen, tokenizer, config.stage)
  return TrainResult(step, model_dir, losses)


def optimizer_state_shardings(tx: optax.GradientTransformation, params: Any, param_shardings: Any, mesh) -> Any:
  """Shardings of `tx.init(params)`: moments like their parameters (sharded over fsdp/tensor), counters replicated.

  (jit(tx.init) left to itself puts the zeros on one device, and replicating them would hold a full optimizer
  state on every device.)
  """
  is_sharding = lambda x: isinstance(x, NamedSharding)
  return optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params), param_shardings,
                               transform_non_params=lambda _: NamedSharding(mesh, P()), is_leaf=is_sharding)


def _on_mesh(tree: Any, mesh) -> Any:
  """Leaves already sharded on `mesh` stay; the others (scalars, counters) are replicated on it."""
  def place(x):
    if isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh:
      return x
    return jax.device_put(x, NamedSharding(mesh, P()))
  return jax.tree.map(place, tree)


def _check_finite(pending: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
  fetched = [(s, jax.device_get(m)) for s, m in pending]
  for s, m in fetched:
    if not bool(m["finite"]):
      raise NonFiniteLossError(
          f"non-finite loss or gradient at step {s} (loss={float(m['loss'])}, grad_norm={float(m['grad_norm'])}); "
          "the update was not applied, training stops; the last checkpoint is intact. Lower the learning rate, "
          "check the data (a sample with extreme values?) or use float32 compute.")
  return fetched


def evaluate(config, tokenizer, model_cfg, eval_step, params, frozen, mesh) -> float:
  """Mean loss over the supervised tokens of the held-out split (one pass)."""
  data_cfg = data_config(config, config.eval_data_files, key="eval_data_files",
                         batch_size=config.eval_batch_size // jax.process_count())
  feeder = BatchFeeder(pipeline.make_eval_iterator(data_cfg, tokenizer, model_cfg), mesh, 1,
                       micro_batch_image_buckets(data_cfg, data_cfg["batch_size"]))
  total, count = 0.0, 0
  while True:
    try:
      batch, _ = feeder.next()
    except StopIteration:
      break
    loss, n = eval_step(params, frozen, jax.tree.map(lambda x: x[0], batch))
    total, count = total + float(loss), count + int(n)
  return total / max(count, 1)
