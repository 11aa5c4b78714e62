"""Attention of new tokens over a head-major KV cache, dtype[B, K, S, H] per layer for keys and for values.

Head-major, because that is the layout both attention forms below read without a transpose: in the einsums the
(row, kv head) batch dimensions lead and each (row, head) reads one contiguous [S, H] block; JAX's Pallas
flash-decoding kernel takes [B * K, S, H] (a free reshape). With a [B, S, K, H] cache JAX's GQA wrapper of the
kernel transposes the whole cache at every call, and XLA's dot may do the same (not yet confirmed on a GPU).

Two forms:
- `attend`: XLA, any bool mask (prefill, padded batches), the same math as `jax.nn.dot_product_attention`'s XLA
  implementation: float32 logits and softmax, probabilities cast to the values' dtype;
- `attend_window`: one new token per row attending to a window of slots [start_b, stop) (the generation engine's
  left-padded prompts followed by the generated tokens), with JAX's Pallas flash-decoding kernel
  (`jax.experimental.pallas.ops.gpu.decode_attention`): one kernel per layer reads the cache once, and only the
  slots up to `stop`. Triton on GPU; on CPU the kernel is interpreted (slow, for tests); not on TPU.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

# In-kernel key blocks are powers of two (Triton tiles) of 16 to 128 slots.
_MIN_BLOCK, _MAX_BLOCK = 16, 128


class SlotWindow(NamedTuple):
  """The cache slots a one-token decode step attends to, per row [start, stop).

  start: int32[B] the row's first real slot (its left padding comes before it).
  stop: int32[] one past the slot of the new token.
  k_splits: the kernel splits the S slots into at most this many parts (the most, a power of two, that cuts S
    into multiples of 16 slots), one program each per (row, kv head); None: `default_splits` for the device.
    A Python int, static.
  """
  start: jax.Array
  stop: jax.Array
  k_splits: int | None = None


def window_of(kv_mask: jax.Array, index: jax.Array | int, k_splits: int | None = None) -> SlotWindow:
  """The window of a decode step writing slot `index`, where bool[B, S] `kv_mask` is False on each row's left
  padding and True after it (the engine's layout): start = the first True slot, stop = index + 1."""
  start = jnp.argmax(kv_mask, axis=1).astype(jnp.int32)
  return SlotWindow(start, jnp.asarray(index, jnp.int32) + 1, k_splits)


def write(cache: jax.Array, new: jax.Array, index: jax.Array | int) -> jax.Array:
  """cache [B, K, S, H] with new [B, T, K, H] written at slots [index, index + T) (in the cache's dtype)."""
  new = jnp.swapaxes(new, 1, 2).astype(cache.dtype)
  return jax.lax.dynamic_update_slice_in_dim(cache, new, index, axis=2)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Masked attention (XLA) of q [B, T, N, H] over k, v [B, K, S, H] (N a multiple of K), bool[B or 1, 1, T, S]
  `mask` (every query sees at least one slot) -> [B, T, N, H] in q's dtype."""
  b, t, n, h = q.shape
  kv_heads = k.shape[1]
  q = q.reshape(b, t, kv_heads, n // kv_heads, h)
  k, v = k.astype(q.dtype), v.astype(q.dtype)
  logits = jnp.einsum("btkgh,bksh->bkgts", q, k, preferred_element_type=jnp.float32) * (1 / math.sqrt(h))
  logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)  # mask -> [B, 1, 1, T, S]
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bkgts,bksh->btkgh", probs, v).reshape(b, t, n, h)


def kernel_interpreted() -> bool:
  """Whether the flash-decoding kernel runs interpreted here: False on GPU, True on CPU; an error elsewhere."""
  backend = jax.default_backend()
  if backend not in ("gpu", "cpu"):
    raise ValueError(f"the flash-decoding kernel (decode_attention='pallas') is written for GPUs (Triton); on "
                     f"{backend} use 'xla'")
  return backend == "cpu"


def default_splits(num_programs: int, slots: int) -> int:
  """Parts of the S slots for the kernel: enough programs (rows x kv heads x parts) for two per GPU core (SM),
  at most 16 parts, each part a multiple of 16 slots."""
  cores = getattr(jax.devices()[0], "core_count", None) or 64
  splits = 1
  while splits < 16 and num_programs * splits < 2 * cores and slots % (2 * splits * _MIN_BLOCK) == 0:
    splits *= 2
  return splits


def _fitting_splits(most: int, slots: int) -> int:
  """The largest power of two <= `most` that cuts `slots` into multiples of 16."""
  if most < 1:
    raise ValueError(f"k_splits must be >= 1, got {most}")
  splits = 1
  while 2 * splits <= most and slots % (2 * splits * _MIN_BLOCK) == 0:
    splits *= 2
  return splits


def _block_size(part: int) -> int:
  """The largest power of two <= 128 dividing `part` (a multiple of 16)."""
  block = _MAX_BLOCK
  while part % block:
    block //= 2
  return block


def attend_window(q: jax.Array, k: jax.Array, v: jax.Array, window: SlotWindow) -> jax.Array:
  """One query per row, q [B, 1, N, H], over the slots [start_b, stop) of k, v [B, K, S, H] -> [B, 1, N, H].

  The kernel runs in the cache's dtype (q is cast to it) and returns its output in that dtype; each of the
  k_splits partial results is rounded to it before they are combined.
  """
  from jax.experimental.pallas.ops.gpu import decode_attention  # pylint: disable=g-import-not-at-top

  b, t, n, h = q.shape
  _, kv_heads, s, _ = k.shape
  if t != 1:
    raise ValueError(f"attend_window takes one new token per row, got {t}")
  if s % _MIN_BLOCK:
    raise ValueError(f"the cache length ({s}) must be a multiple of {_MIN_BLOCK}")
  splits = default_splits(b * kv_heads, s) if window.k_splits is None else _fitting_splits(window.k_splits, s)
  out = decode_attention.mqa(
      q.reshape(b * kv_heads, n // kv_heads, h).astype(k.dtype),
      k.reshape(b * kv_heads, s, h), v.reshape(b * kv_heads, s, h),
      start_idx=jnp.repeat(window.start, kv_heads), kv_seq_len=jnp.broadcast_to(window.stop, (b * kv_heads,)),
      k_splits=splits, block_k=_block_size(s // splits), interpret=kernel_interpreted())
  return out.reshape(b, 1, n, h).astype(q.dtype)
