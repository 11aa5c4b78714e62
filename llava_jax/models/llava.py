"""LLaVA: CLIP vision tower -> projector -> LLaMA, with image features spliced into the token embeddings.

Inputs use LLaVA's convention: `input_ids` hold ONE placeholder (IMAGE_TOKEN_INDEX = -200) per image; every
placeholder expands to `image_seq_length` positions of projected image features. The images of a batch are one
flat array [I, S, S, C] in row-major placeholder order (a text-only sample contributes none, so a text-only batch
never runs the vision tower; slots past the last placeholder are padding and never read). The expanded sequence
is truncated to the output length (by default the input length) AFTER expansion, as LLaVA does.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax.models.clip import CLIPVisionTransformer
from llava_jax.models.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX, ModelConfig, RuntimeConfig
from llava_jax.models.llama import LlamaModel
from llava_jax.models.projector import Projector


class Spliced(NamedTuple):
  """A batch after image expansion, L positions per row."""
  embeds: jax.Array  # [B, L, D]
  labels: jax.Array | None  # int32[B, L], IGNORE_INDEX at image and padding positions
  mask: jax.Array  # bool[B, L] real positions
  positions: jax.Array  # int32[B, L] RoPE positions (0.. per sample)


def splice(input_ids: jax.Array, attention_mask: jax.Array, text_embeds: jax.Array,
           image_features: jax.Array | None, labels: jax.Array | None = None, *, out_len: int | None = None,
           pad_left: bool = False) -> Spliced:
  """Expands each image placeholder into its image features.

  Args:
    input_ids: int32[B, T] with IMAGE_TOKEN_INDEX placeholders; padding anywhere `attention_mask` is 0.
    attention_mask: [B, T] 1 for real tokens (placeholders included).
    text_embeds: [B, T, D] token embeddings (rows at placeholders are ignored).
    image_features: [I, N, D] projected features, consumed in row-major placeholder order; None if no images.
    labels: int32[B, T] or None.
    out_len: L, the expanded length (default T); longer samples are truncated.
    pad_left: put padding before the real positions (batched generation) instead of after.
  Returns:
    Spliced with L positions per row.
  """
  b, t = input_ids.shape
  out_len = t if out_len is None else out_len
  valid = attention_mask.astype(bool)
  is_image = (input_ids == IMAGE_TOKEN_INDEX) & valid
  n_per_image = 0 if image_features is None else image_features.shape[1]
  width = jnp.where(is_image, n_per_image, valid.astype(jnp.int32))  # [B, T] positions each token takes
  end = jnp.cumsum(width, axis=1)
  start = end - width
  total = end[:, -1]  # [B]
  images_before_row = jnp.cumsum(is_image.sum(1)) - is_image.sum(1)  # [B] global index of each row's first image
  image_rank = jnp.cumsum(is_image, axis=1) - 1  # [B, T] index of each placeholder within its row

  out = jnp.arange(out_len)[None, :]
  offset = (out_len - jnp.minimum(total, out_len))[:, None] if pad_left else 0
  pos = jnp.broadcast_to(out - offset, (b, out_len))  # [B, L] position within the expanded sample
  out_valid = (pos >= 0) & (pos < total[:, None])
  pos = jnp.clip(pos, 0, None)
  src = jax.vmap(lambda e, p: jnp.searchsorted(e, p, side="right"))(end, pos)  # [B, L] source token
  src = jnp.clip(src, 0, t - 1)
  take = lambda a: jnp.take_along_axis(a, src, axis=1)
  from_image = take(is_image) & out_valid

  embeds = jnp.take_along_axis(text_embeds, src[..., None], axis=1)
  if image_features is not None and image_features.shape[0] > 0:
    image_index = images_before_row[:, None] + take(image_rank)
    patch_index = jnp.clip(pos - take(start), 0, n_per_image - 1)
    image_rows = image_features[jnp.clip(image_index, 0, image_features.shape[0] - 1), patch_index]
    embeds = jnp.where(from_image[..., None], image_rows.astype(embeds.dtype), embeds)
  embeds = jnp.where(out_valid[..., None], embeds, jnp.zeros_like(embeds))
  out_labels = None
  if labels is not None:
    out_labels = jnp.where(out_valid & ~from_image, take(labels), IGNORE_INDEX)
  return Spliced(embeds, out_labels, out_valid, jnp.where(out_valid, pos, 0).astype(jnp.int32))


class LlavaModel(nnx.Module):
  """vision_tower (CLIP), projector, language_model (LLaMA)."""

  def __init__(self, cfg: ModelConfig, runtime: RuntimeConfig = RuntimeConfig(), *, rngs: nnx.Rngs):
    self.cfg, self.runtime = cfg, runtime
    self.vision_tower = CLIPVisionTransformer(cfg.vision, runtime, rngs=rngs)
    self.projector = Projector(cfg.projector_type, cfg.vision.hidden_size, cfg.text.hidden_size, runtime,
                               rngs=rngs)
    self.language_model = LlamaModel(cfg.text, runtime, rngs=rngs)

  def image_features(self, images: jax.Array) -> jax.Array:
    """images float[I, S, S, C] -> projected features [I, N, D_text]."""
    feats = self.vision_tower.features(images, self.cfg.vision_feature_layer, self.cfg.vision_feature_select)
    return self.projector(feats)

  def embed_inputs(self, input_ids: jax.Array, attention_mask: jax.Array, images: jax.Array | None = None,
                   labels: jax.Array | None = None, *, out_len: int | None = None,
                   pad_left: bool = False) -> Spliced:
    """Token embeddings with image features spliced in; see `splice` for shapes."""
    safe_ids = jnp.where(input_ids == IMAGE_TOKEN_INDEX, 0, input_ids)
    text_embeds = self.language_model.embed(safe_ids)
    feats = self.image_features(images) if images is not None and images.shape[0] > 0 else None
    return splice(input_ids, attention_mask, text_embeds, feats, labels, out_len=out_len, pad_left=pad_left)

  def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array, images: jax.Array | None = None,
                    labels: jax.Array | None = None) -> tuple[jax.Array, Spliced]:
    """Training forward pass up to the final norm: -> ([B, L, D], Spliced). Right padding, causal attention."""
    spliced = self.embed_inputs(input_ids, attention_mask, images, labels)
    hidden, _ = self.language_model.decode(spliced.embeds, spliced.positions)
    return hidden, spliced

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, images: jax.Array | None = None,
               labels: jax.Array | None = None) -> tuple[jax.Array, Spliced]:
    """-> (logits [B, L, V], Spliced)."""
    hidden, spliced = self.hidden_states(input_ids, attention_mask, images, labels)
    return self.language_model.logits(hidden), spliced
