"""CLIP vision transformer (ViT-L/14 at 224/336 px, any size from `VisionConfig`), as used by LLaVA."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax import sharding
from llava_jax.models import layers
from llava_jax.models.config import RuntimeConfig, VisionConfig


def quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


EMBEDDING_INIT_STD = 0.02  # class and position embeddings at random init


class CLIPAttention(nnx.Module):
  """Bidirectional multi-head self-attention with biased q/k/v/out projections."""

  def __init__(self, cfg: VisionConfig, runtime: RuntimeConfig, *, rngs: nnx.Rngs):
    d, dt, pdt = cfg.hidden_size, layers.dtype_of(runtime.dtype), layers.dtype_of(runtime.param_dtype)
    self.num_heads = cfg.num_attention_heads
    self.implementation = layers.attention_implementation(runtime)
    linear = lambda: nnx.Linear(d, d, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.q_proj, self.k_proj, self.v_proj, self.out_proj = linear(), linear(), linear(), linear()

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, T, D] -> [B, T, D]."""
    b, t, d = x.shape
    split = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
    out = layers.attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                           implementation=self.implementation)
    return self.out_proj(out.reshape(b, t, d))


class CLIPEncoderLayer(nnx.Module):
  """Pre-norm transformer block: LN -> attention -> residual, LN -> MLP (quick_gelu) -> residual."""

  def __init__(self, cfg: VisionConfig, runtime: RuntimeConfig, *, rngs: nnx.Rngs):
    d, dt, pdt = cfg.hidden_size, layers.dtype_of(runtime.dtype), layers.dtype_of(runtime.param_dtype)
    norm = lambda: nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, param_dtype=pdt, rngs=rngs)
    self.layer_norm1, self.layer_norm2 = norm(), norm()
    self.self_attn = CLIPAttention(cfg, runtime, rngs=rngs)
    self.fc1 = nnx.Linear(d, cfg.intermediate_size, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.fc2 = nnx.Linear(cfg.intermediate_size, d, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.activation = _ACTIVATIONS[cfg.hidden_act]

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, T, D] -> [B, T, D]."""
    x = x + self.self_attn(layers.layer_norm(self.layer_norm1, x))
    return x + self.fc2(self.activation(self.fc1(layers.layer_norm(self.layer_norm2, x))))


class CLIPVisionTransformer(nnx.Module):
  """Patch embedding (conv, no bias) + class/position embeddings, pre-LN, encoder layers, post-LN.

  Images are channels-last: float32[B, S, S, C] already normalised with CLIP's mean/std.
  """

  def __init__(self, cfg: VisionConfig, runtime: RuntimeConfig = RuntimeConfig(), *, rngs: nnx.Rngs):
    self.cfg, self.runtime = cfg, runtime
    d, dt, pdt = cfg.hidden_size, layers.dtype_of(runtime.dtype), layers.dtype_of(runtime.param_dtype)
    self.patch_embedding = nnx.Conv(cfg.num_channels, d, kernel_size=(cfg.patch_size, cfg.patch_size),
                                    strides=(cfg.patch_size, cfg.patch_size), padding="VALID", use_bias=False,
                                    dtype=dt, param_dtype=pdt, rngs=rngs)
    self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (d,), pdt) * EMBEDDING_INIT_STD)
    self.position_embedding = nnx.Param(
        jax.random.normal(rngs.params(), (cfg.num_patches + 1, d), pdt) * EMBEDDING_INIT_STD)
    norm = lambda: nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, param_dtype=pdt, rngs=rngs)
    self.pre_layrnorm, self.post_layernorm = norm(), norm()
    self.layers = layers.make_stack(lambda r: CLIPEncoderLayer(cfg, runtime, rngs=r), cfg.num_hidden_layers,
                                    rngs)

  def embed(self, images: jax.Array) -> jax.Array:
    """images [B, S, S, C] -> embeddings after pre_layrnorm [B, 1 + P, D] (hidden_states[0])."""
    dt = layers.dtype_of(self.runtime.dtype)
    patches = self.patch_embedding(images.astype(dt))
    b = patches.shape[0]
    patches = patches.reshape(b, -1, patches.shape[-1])
    cls = jnp.broadcast_to(self.class_embedding.value.astype(dt), (b, 1, patches.shape[-1]))
    x = jnp.concatenate([cls, patches], axis=1) + self.position_embedding.value.astype(dt)
    return layers.layer_norm(self.pre_layrnorm, x)

  def __call__(self, images: jax.Array, *, num_layers: int | None = None,
               return_all: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Runs the first `num_layers` encoder layers (all by default).

    Args:
      images: float[B, S, S, C].
      num_layers: how many layers to run; the output is hidden_states[num_layers].
      return_all: also return every hidden state.
    Returns:
      [B, 1 + P, D] hidden state after `num_layers` layers (post_layernorm NOT applied), and with `return_all`
      the stack [num_layers + 1, B, 1 + P, D] of hidden_states[0..num_layers].
    """
    num_layers = self.cfg.num_hidden_layers if num_layers is None else num_layers
    x = self.embed(images)

    def body(layer, h, _):
      h = sharding.constrain_batch(layer(sharding.constrain_batch(h)))
      return h, (h if return_all else None)

    out, ys = layers.run_stack(self.layers, body, x, num_layers=num_layers, scan=self.runtime.scan_layers,
                               remat_policy=self.runtime.remat_policy)
    if return_all:
      return out, jnp.concatenate([x[None], ys], axis=0) if num_layers else x[None]
    return out

  def features(self, images: jax.Array, select_layer: int, select: str) -> jax.Array:
    """LLaVA's image features: hidden_states[select_layer], CLS dropped ('patch') or kept ('cls_patch').

    images [B, S, S, C] -> [B, P or 1 + P, D]. Layers after the selected one are never run.
    """
    total = self.cfg.num_hidden_layers + 1  # len(hidden_states)
    index = select_layer % total if -total <= select_layer < total else None
    if index is None:
      raise ValueError(f"select_layer {select_layer} out of range for {self.cfg.num_hidden_layers} layers")
    hidden = self(images, num_layers=index)
    if select == "patch":
      return hidden[:, 1:]
    if select == "cls_patch":
      return hidden
    raise ValueError(f"unknown vision feature selection {select!r} (patch | cls_patch)")
