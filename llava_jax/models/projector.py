"""Multimodal projectors: vision features -> LLM embedding space."""
from __future__ import annotations

import re

import jax
from flax import nnx

from llava_jax.models import layers
from llava_jax.models.config import RuntimeConfig

_MLP_RE = re.compile(r"^mlp(\d+)x_gelu$")


class Projector(nnx.Module):
  """'linear' = one Linear; 'mlp{N}x_gelu' = Linear, then (exact GELU, Linear) x (N - 1); 'identity'.

  Linear layers are held in `self.linears` (LLaVA's `mm_projector.{0, 2, 4, ...}`, llava-hf's `linear_{1, 2}`).
  """

  def __init__(self, projector_type: str, vision_dim: int, text_dim: int,
               runtime: RuntimeConfig = RuntimeConfig(), *, rngs: nnx.Rngs):
    self.projector_type = projector_type
    dt, pdt = layers.dtype_of(runtime.dtype), layers.dtype_of(runtime.param_dtype)
    linear = lambda i, o: nnx.Linear(i, o, dtype=dt, param_dtype=pdt, rngs=rngs)
    if projector_type == "identity":
      if vision_dim != text_dim:
        raise ValueError(f"identity projector needs equal widths, got vision {vision_dim} and text {text_dim}")
      depth = 0
    elif projector_type == "linear":
      depth = 1
    elif match := _MLP_RE.match(projector_type):
      depth = int(match.group(1))
    else:
      raise ValueError(f"unknown projector_type {projector_type!r} (linear | mlp{{N}}x_gelu | identity)")
    self.linears = nnx.List([linear(vision_dim if i == 0 else text_dim, text_dim) for i in range(depth)])

  def __call__(self, features: jax.Array) -> jax.Array:
    """[..., vision_dim] -> [..., text_dim]."""
    x = features
    for i, lin in enumerate(self.linears):
      if i:
        x = jax.nn.gelu(x, approximate=False)
      x = lin(x)
    return x
