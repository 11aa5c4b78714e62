"""The loss and the jitted train/eval steps.

The loss is the mean over the supervised tokens of the WHOLE global batch (micro-batches included), as
transformers computes it: sum of token losses / number of supervised tokens. Logits are produced in chunks of the
sequence under `jax.checkpoint`, so at most [B, chunk, V] float32 logits exist at a time, in the forward and the
backward pass.

Only the trainable parameters are differentiated: the frozen ones enter as constants, so no weight gradient is
computed for them (stage 1 does only input-gradient work in the LLM) and they carry no optimizer state.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from llava_jax.models.config import IGNORE_INDEX


class TrainState(NamedTuple):
  step: jax.Array  # int32[]
  params: Any  # trainable parameters (pure dict)
  opt_state: Any


def chunked_cross_entropy(hidden: jax.Array, logits_fn, labels: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
  """Next-token cross-entropy summed over supervised positions.

  Args:
    hidden: [B, L, D] final hidden states.
    logits_fn: [B, C, D] -> [B, C, V].
    labels: int32[B, L] aligned with the inputs (position t's logits predict labels[t + 1]).
    chunk: positions per logits chunk (L is padded up to a multiple).
  Returns:
    (float32[] sum of token losses, int32[] number of supervised tokens).
  """
  b, length, d = hidden.shape
  targets = jnp.concatenate([labels[:, 1:], jnp.full((b, 1), IGNORE_INDEX, labels.dtype)], axis=1)
  chunk = min(chunk, length)
  n_chunks = -(-length // chunk)
  pad = n_chunks * chunk - length
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
  hidden = hidden.reshape(b, n_chunks, chunk, d).swapaxes(0, 1)
  targets = targets.reshape(b, n_chunks, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def one(h, t):
    logits = logits_fn(h).astype(jnp.float32)
    valid = t != IGNORE_INDEX
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, t, 0))
    return jnp.sum(jnp.where(valid, losses, 0.0))

  def body(total, xs):
    return total + one(*xs), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hidden, targets))
  count = jnp.sum(labels[:, 1:] != IGNORE_INDEX)
  return total, count


def loss_sum(model, batch: dict, chunk: int) -> tuple[jax.Array, jax.Array]:
  """(sum of token losses, supervised token count) of one micro-batch."""
  images = batch.get("images")
  hidden, spliced = model.hidden_states(batch["input_ids"], batch["attention_mask"], images, batch["labels"])
  return chunked_cross_entropy(hidden, model.language_model.logits, spliced.labels, chunk)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    *, loss_chunk: int):
  """train_step(state, frozen, batch) -> (state, metrics); batch arrays are [accum, B, ...] micro-batches.

  A step whose loss or gradient is not finite leaves the state unchanged and reports `finite = False`.
  """

  def train_step(state: TrainState, frozen: Any, batch: dict):

    def micro_loss(params, micro):
      model = nnx.merge(graphdef, params, frozen)
      return loss_sum(model, micro, loss_chunk)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def accumulate(carry, micro):
      grads, total, count = carry
      (loss, n), g = grad_fn(state.params, micro)
      return (jax.tree.map(jnp.add, grads, g), total + loss, count + n), None

    if jax.tree.leaves(batch)[0].shape[0] == 1:  # no accumulation: no zero-filled gradient buffer to add to
      (total, count), grads = grad_fn(state.params, jax.tree.map(lambda x: x[0], batch))
    else:
      zeros = jax.tree.map(jnp.zeros_like, state.params)
      init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
      (grads, total, count), _ = jax.lax.scan(accumulate, init, batch)
    denom = jnp.maximum(count, 1).astype(jnp.float32)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss = total / denom
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = TrainState(state.step + jnp.where(finite, 1, 0), keep(params, state.params),
                           keep(opt_state, state.opt_state))
    metrics = {"loss": loss, "grad_norm": grad_norm, "supervised_tokens": count,
               "learning_rate": schedule(state.step), "finite": finite}
    return new_state, metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef, *, loss_chunk: int):
  """eval_step(params, frozen, batch) -> (loss sum, token count) for one [B, ...] batch."""

  def eval_step(params: Any, frozen: Any, batch: dict):
    return loss_sum(nnx.merge(graphdef, params, frozen), batch, loss_chunk)

  return eval_step
