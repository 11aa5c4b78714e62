"""Building blocks shared by the CLIP and LLaMA ports: attention, RoPE, RMSNorm, remat and layer stacks."""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax.models.config import RuntimeConfig


def dtype_of(name: str | Any) -> Any:
  return jnp.dtype(name) if isinstance(name, str) else name


def attention_implementation(runtime: RuntimeConfig) -> str:
  """'cudnn' on GPU for 16-bit compute, 'xla' otherwise (cuDNN's fused attention takes no float32), unless the
  runtime config names one."""
  if runtime.attention_impl:
    return runtime.attention_impl
  half = jnp.dtype(dtype_of(runtime.dtype)) in (jnp.bfloat16, jnp.float16)
  return "cudnn" if jax.default_backend() == "gpu" and half else "xla"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str, causal: bool = False,
              mask: jax.Array | None = None) -> jax.Array:
  """Scaled dot-product attention (grouped-query when k/v have fewer heads).

  Args:
    q: [B, T, N, H] queries.
    k, v: [B, S, K, H] keys and values, N a multiple of K.
    implementation: 'xla' or 'cudnn' (passed to `jax.nn.dot_product_attention`).
    causal: mask key s > query t (only with T == S and no `mask`).
    mask: bool[B, 1, T, S] keys each query may see; overrides `causal`.
  Returns:
    [B, T, N, H].
  """
  if mask is not None:
    # cuDNN takes only causal/length masks; arbitrary masks (left padding, KV-cache decode) go through XLA.
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
  return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)


# --- Rotary position embeddings (rotate-half layout, as transformers' LLaMA) ------------------------------------


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> jax.Array:
  """float32[head_dim // 2] inverse frequencies, with LLaMA-3 or linear `rope_scaling` applied."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if not scaling:
    return inv_freq
  kind = scaling.get("rope_type", scaling.get("type"))
  factor = float(scaling["factor"])
  if kind == "linear":
    return inv_freq / factor
  if kind == "llama3":
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(is_medium, smoothed, scaled)
  raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: linear, llama3)")


def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
  """positions int32[B, T] -> (cos, sin) float32[B, T, H] (frequencies repeated for both halves)."""
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B, T, N, H] rotated by cos/sin [B, T, H] in the rotate-half layout."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


# --- Norms -------------------------------------------------------------------------------------------------------


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """LLaMA RMSNorm of x [..., D]: normalised in float32, scaled in x's dtype (as transformers)."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return weight.astype(x.dtype) * normed.astype(x.dtype)


class RMSNorm(nnx.Module):
  """LLaMA RMSNorm. With `recompute`, the backward pass recomputes the float32 values from the input instead of
  saving them (the residual is x itself, in its dtype)."""

  def __init__(self, dim: int, eps: float, *, param_dtype: Any = jnp.float32, recompute: bool = False):
    self.eps, self.recompute = eps, recompute
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., D] -> [..., D]."""
    fn = remat(lambda x, w: rms_norm(x, w, self.eps), "full" if self.recompute else "none")
    return fn(x, self.weight.value)


def layer_norm(norm: nnx.LayerNorm, x: jax.Array) -> jax.Array:
  """LayerNorm computed in float32 and cast back to x's dtype."""
  return norm(x.astype(jnp.float32)).astype(x.dtype)


# --- Remat and stacks of layers ---------------------------------------------------------------------------------

_REMAT_POLICIES: dict[str, Callable | None] = {
    "full": None,  # save nothing: recompute the whole layer
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out", "mlp_out"),
}


def remat(fn: Callable, policy: str) -> Callable:
  """Wraps a layer body with `jax.checkpoint` under the named policy ('none' = no remat)."""
  if policy == "none":
    return fn
  if policy not in _REMAT_POLICIES:
    raise ValueError(f"unknown remat_policy {policy!r}; known: none, {', '.join(_REMAT_POLICIES)}")
  return jax.checkpoint(fn, policy=_REMAT_POLICIES[policy], prevent_cse=False)


def make_stack(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
  """Creates `num_layers` layers whose parameters are stacked on a leading axis [L, ...]."""

  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(rngs):
    return make_layer(rngs)

  return create(rngs)


def run_stack(stack: nnx.Module, body: Callable, carry: Any, xs: Any = None, *, num_layers: int,
              scan: bool, remat_policy: str = "none") -> tuple[Any, Any]:
  """Applies the first `num_layers` layers of a stack.

  `body(layer, carry, x_i) -> (carry, y_i)` is called with one layer merged from the stacked parameters; `xs`
  (leading axis = layer) is sliced per layer and the `y_i` are stacked. With `scan` the layers run under
  `jax.lax.scan` (compile time independent of depth); otherwise in an unrolled Python loop. Parameters are the
  same in both cases.
  """
  graphdef, state = nnx.split(stack)
  total = jax.tree.leaves(state)[0].shape[0]
  if num_layers < total:
    state = jax.tree.map(lambda a: a[:num_layers], state)

  def step(carry, layer_and_x):
    layer_state, x_i = layer_and_x
    return body(nnx.merge(graphdef, layer_state), carry, x_i)

  step = remat(step, remat_policy)
  if scan:
    return jax.lax.scan(step, carry, (state, xs))
  ys = []
  for i in range(num_layers):
    carry, y = step(carry, jax.tree.map(lambda a: a[i], (state, xs)))
    ys.append(y)
  if all(y is None for y in ys):
    return carry, None
  return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)
