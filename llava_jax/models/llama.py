"""LLaMA / Vicuna decoder: RMSNorm, RoPE attention (multi-head or grouped-query), SwiGLU MLP, KV cache.

Masking has three modes, chosen by the arguments of `LlamaModel.decode`:
- training (right padding): no `kv_mask`, no cache -> plain causal attention (cuDNN on GPU); padded positions
  are after every real token so they are never attended to, and their outputs are ignored by the loss;
- padded batches (left or right padding) without a cache: `kv_mask` bool[B, T] marks real tokens;
- generation with a KV cache of S slots: `kv_mask` bool[B, S] marks slots holding real tokens, the new tokens are
  written at slots [cache_index, cache_index + T) and attend to slots <= their own. The cache is head-major,
  [B, K, S, H] per layer (`cache_attention`). The generation engine's one-token steps can instead pass a
  `cache_attention.SlotWindow` (a contiguous window of slots per row) to use the flash-decoding kernel.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from llava_jax import sharding
from llava_jax.models import cache_attention
from llava_jax.models import layers
from llava_jax.models.config import RuntimeConfig, TextConfig


class KVCache(NamedTuple):
  """Keys and values of every layer: dtype[L, B, K, S, H] each (head-major, see `cache_attention`)."""
  k: jax.Array
  v: jax.Array

  @classmethod
  def zeros(cls, cfg: TextConfig, batch: int, length: int, dtype) -> "KVCache":
    shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, length, cfg.head_size)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def fuse_linears(linears: list[nnx.Linear]) -> nnx.Linear:
  """One nnx.Linear whose kernel (and bias) is the concatenation of `linears`' along the output axis: x @ fused
  equals the concatenated outputs of the parts (they share the input, dtype and bias use)."""
  first = linears[0]
  d_in = first.kernel.value.shape[0]
  d_out = sum(lin.kernel.value.shape[-1] for lin in linears)
  fused = nnx.eval_shape(lambda: nnx.Linear(d_in, d_out, use_bias=first.use_bias, dtype=first.dtype,
                                            param_dtype=first.kernel.value.dtype, rngs=nnx.Rngs(0)))
  fused.kernel.value = jnp.concatenate([lin.kernel.value for lin in linears], axis=-1)
  if first.use_bias:
    fused.bias.value = jnp.concatenate([lin.bias.value for lin in linears], axis=-1)
  return fused


def output_axis_whole(linear: nnx.Linear) -> bool:
  """True when every device holds all of the kernel's output columns (fusing then needs no resharding)."""
  kernel = linear.kernel.value
  sharding = getattr(kernel, "sharding", None)
  return sharding is None or sharding.shard_shape(kernel.shape)[-1] == kernel.shape[-1]


class LlamaAttention(nnx.Module):
  """Self-attention with RoPE on q/k; `num_key_value_heads < num_attention_heads` gives grouped-query."""

  def __init__(self, cfg: TextConfig, runtime: RuntimeConfig, *, rngs: nnx.Rngs):
    dt, pdt = layers.dtype_of(runtime.dtype), layers.dtype_of(runtime.param_dtype)
    self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
    self.implementation = layers.attention_implementation(runtime)
    linear = lambda i, o: nnx.Linear(i, o, use_bias=cfg.attention_bias, dtype=dt, param_dtype=pdt, rngs=rngs)
    d = cfg.hidden_size
    self.q_proj = linear(d, self.n_heads * self.head_dim)
    self.k_proj = linear(d, self.n_kv * self.head_dim)
    self.v_proj = linear(d, self.n_kv * self.head_dim)
    self.o_proj = linear(self.n_heads * self.head_dim, d)

  def fuse_projections(self) -> None:
    """Replaces q/k/v_proj by one `qkv_proj` (generation: one matmul instead of three per token)."""
    self.qkv_proj = fuse_linears([self.q_proj, self.k_proj, self.v_proj])
    del self.q_proj, self.k_proj, self.v_proj

  def _qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    if not hasattr(self, "qkv_proj"):
      return self.q_proj(x), self.k_proj(x), self.v_proj(x)
    q_size, kv_size = self.n_heads * self.head_dim, self.n_kv * self.head_dim
    return tuple(jnp.split(self.qkv_proj(x), [q_size, q_size + kv_size], axis=-1))

  def __call__(self, x, cos, sin, mask, cache_kv, cache_index, window=None):
    """x [B, T, D]; cos/sin [B, T, H]; mask bool[B, 1, T, S] or None (causal); cache_kv ([B, K, S, H] x 2) or None;
    window: a `cache_attention.SlotWindow` (T = 1, with a cache) to attend with the flash-decoding kernel
    instead of `mask`.

    Returns ([B, T, D], updated cache_kv or None).
    """
    b, t, _ = x.shape
    q, k, v = self._qkv(x)
    q = layers.apply_rope(q.reshape(b, t, self.n_heads, self.head_dim), cos, sin)
    k = layers.apply_rope(k.reshape(b, t, self.n_kv, self.head_dim), cos, sin)
    v = v.reshape(b, t, self.n_kv, self.head_dim)
    if cache_kv is None:
      out = layers.attention(q, k, v, implementation=self.implementation, causal=mask is None, mask=mask)
    else:
      cache_kv = tuple(cache_attention.write(c, new, cache_index) for c, new in zip(cache_kv, (k, v)))
      if window is not None:
        out = cache_attention.attend_window(q, *cache_kv, window)
      else:
        out = cache_attention.attend(q, *cache_kv, mask)
    out = checkpoint_name(out, "attn_out")
    return self.o_proj(out.reshape(b, t, self.n_heads * self.head_dim)), cache_kv


class LlamaMLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: TextConfig, runtime: RuntimeConfig, *, rngs: nnx.Rngs):
    dt, pdt = layers.dtype_of(runtime.dtype), layers.dtype_of(runtime.param_dtype)
    linear = lambda i, o: nnx.Linear(i, o, use_bias=cfg.mlp_bias, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.gate_proj = linear(cfg.hidden_size, cfg.intermediate_size)
    self.up_proj = linear(cfg.hidden_size, cfg.intermediate_size)
    self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size)
    self.recompute = runtime.recompute_elementwise

  def fuse_projections(self) -> None:
    """Replaces gate/up_proj by one `gate_up_proj` (generation: one matmul instead of two per token)."""
    self.gate_up_proj = fuse_linears([self.gate_proj, self.up_proj])
    del self.gate_proj, self.up_proj

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, T, D] -> [B, T, D]."""
    # With recompute, the backward pass keeps gate and up [B, T, F] only, not silu's intermediates.
    glu = layers.remat(lambda gate, up: jax.nn.silu(gate) * up, "full" if self.recompute else "none")
    if hasattr(self, "gate_up_proj"):
      gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
    else:
      gate, up = self.gate_proj(x), self.up_proj(x)
    return self.down_proj(glu(gate, up))


class LlamaDecoderLayer(nnx.Module):

  def __init__(self, cfg: TextConfig, runtime: RuntimeConfig, *, rngs: nnx.Rngs):
    pdt, lean = layers.dtype_of(runtime.param_dtype), runtime.recompute_elementwise
    self.input_layernorm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pdt, recompute=lean)
    self.post_attention_layernorm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pdt,
                                                   recompute=lean)
    self.self_attn = LlamaAttention(cfg, runtime, rngs=rngs)
    self.mlp = LlamaMLP(cfg, runtime, rngs=rngs)

  def __call__(self, x, cos, sin, mask, cache_kv, cache_index, window=None):
    attn_out, cache_kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_kv, cache_index, window)
    x = x + attn_out
    mlp_out = checkpoint_name(self.mlp(self.post_attention_layernorm(x)), "mlp_out")
    return x + mlp_out, cache_kv


class LlamaModel(nnx.Module):
  """Token embeddings, decoder layers (stacked parameters [L, ...]), final norm and LM head."""

  def __init__(self, cfg: TextConfig, runtime: RuntimeConfig = RuntimeConfig(), *, rngs: nnx.Rngs):
    self.cfg, self.runtime = cfg, runtime
    dt, pdt = layers.dtype_of(runtime.dtype), layers.dtype_of(runtime.param_dtype)
    self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.layers = layers.make_stack(lambda r: LlamaDecoderLayer(cfg, runtime, rngs=r), cfg.num_hidden_layers,
                                    rngs)
    self.norm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pdt,
                               recompute=runtime.recompute_elementwise)
    if not cfg.tie_word_embeddings:
      self.lm_head = nnx.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, dtype=dt, param_dtype=pdt,
                                rngs=rngs)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """int32[B, T] -> [B, T, D] (compute dtype)."""
    return self.embed_tokens(input_ids)

  def decode(self, x: jax.Array, positions: jax.Array, *, kv_mask: jax.Array | None = None,
             cache: KVCache | None = None, cache_index: jax.Array | int = 0) -> tuple[jax.Array, KVCache | None]:
    """Runs the decoder layers and the final norm.

    Args:
      x: [B, T, D] input embeddings.
      positions: int32[B, T] RoPE positions.
      kv_mask: bool[B, S] real-token slots (S = T without a cache, the cache length with one); None = causal only.
      cache: KVCache with S slots, or None.
      cache_index: slot of the first of the T new tokens.
    Returns:
      ([B, T, D] normed hidden states, the updated cache or None).
    """
    cos, sin = rope_tables(self.cfg, positions)
    mask = None
    if kv_mask is not None or cache is not None:
      s = cache.k.shape[3] if cache is not None else x.shape[1]
      mask = slot_mask(x.shape[1], s, cache_index, kv_mask)

    def body(layer, h, layer_cache):
      h, layer_cache = layer(sharding.constrain_batch(h), cos, sin, mask, layer_cache, cache_index)
      return sharding.constrain_batch(h), layer_cache

    xs = (cache.k, cache.v) if cache is not None else None
    x, new_kv = layers.run_stack(self.layers, body, x, xs, num_layers=self.cfg.num_hidden_layers,
                                 scan=self.runtime.scan_layers, remat_policy=self.runtime.remat_policy)
    return self.norm(x), (KVCache(*new_kv) if cache is not None else None)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """[B, T, D] -> [B, T, V] in the compute dtype."""
    if self.cfg.tie_word_embeddings:
      return self.embed_tokens.attend(hidden)
    return self.lm_head(hidden)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    """Full forward pass: int32[B, T] (bool[B, T] real tokens, any padding side) -> logits [B, T, V]."""
    if positions is None:
      positions = default_positions(attention_mask, input_ids.shape)
    hidden, _ = self.decode(self.embed(input_ids), positions, kv_mask=attention_mask)
    return self.logits(hidden)


def rope_tables(cfg: TextConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(cos, sin) float32[B, T, H] for int32[B, T] positions, with the config's theta and scaling."""
  inv_freq = layers.rope_inverse_frequencies(cfg.head_size, cfg.rope_theta, cfg.rope_scaling_dict)
  return layers.rope_cos_sin(positions, inv_freq)


def slot_mask(t: int, s: int, first_slot: jax.Array | int, kv_mask: jax.Array | None) -> jax.Array:
  """bool[B or 1, 1, T, S]: new tokens in slots [first_slot, first_slot + T) see slots <= their own and in kv_mask."""
  mask = (jnp.arange(s)[None, :] <= (first_slot + jnp.arange(t))[:, None])[None, None]
  return mask if kv_mask is None else mask & kv_mask[:, None, None, :]


def default_positions(attention_mask: jax.Array | None, shape: tuple[int, int]) -> jax.Array:
  """int32[B, T] positions counting real tokens only (so left padding does not shift RoPE), as transformers."""
  if attention_mask is None:
    return jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), shape)
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)
