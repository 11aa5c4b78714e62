"""LLaVA against transformers' LlavaForConditionalGeneration (tiny random config, fp32), and the splice rules."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from llava_jax.models import loaders
from llava_jax.models.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX, ModelConfig, RuntimeConfig
from llava_jax.models.llava import LlavaModel, splice
from tests.parity import assert_fp32_close

IMAGE_TOKEN = 99  # llava-hf keeps '<image>' inside the vocabulary


def hf_llava(seed=0, layers=3):
  torch.manual_seed(seed)
  cfg = transformers.LlavaConfig(
      vision_config=transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                                  num_attention_heads=4, image_size=28, patch_size=14),
      text_config=transformers.LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           max_position_embeddings=128),
      image_token_index=IMAGE_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy="default",
      projector_hidden_act="gelu", image_seq_length=4)
  return transformers.LlavaForConditionalGeneration(cfg).eval()


def ours_from(hf, **runtime):
  cfg = ModelConfig.from_hf_llava(hf.config)
  model = LlavaModel(cfg, RuntimeConfig(**runtime), rngs=nnx.Rngs(0))
  nnx.update(model, loaders.load_llava_state_dict(model, hf.state_dict()))
  return model


def mixed_batch(n_patches=4, seed=0):
  """Three samples: one image, two images, text only; collapsed ids (ours) and expanded ids (HF)."""
  rng = np.random.RandomState(seed)
  text = lambda n: list(rng.randint(3, 90, n))
  rows = [
      [1] + [IMAGE_TOKEN_INDEX] + text(7),
      [1] + text(3) + [IMAGE_TOKEN_INDEX] + text(2) + [IMAGE_TOKEN_INDEX] + text(4),
      [1] + text(6),
  ]
  expanded = [sum(([IMAGE_TOKEN] * n_patches if t == IMAGE_TOKEN_INDEX else [t] for t in r), []) for r in rows]
  length = max(len(r) for r in expanded)
  pad = lambda r: r + [0] * (length - len(r))
  ids = np.array([pad(r) for r in rows], np.int32)
  mask = np.array([pad([1] * len(r)) for r in rows], np.int32)
  hf_ids = np.array([pad(r) for r in expanded], np.int64)
  hf_mask = np.array([pad([1] * len(r)) for r in expanded], np.int64)
  images = rng.randn(3, 28, 28, 3).astype(np.float32)  # image 0 -> row 0, images 1, 2 -> row 1
  return ids, mask, images, hf_ids, hf_mask


@pytest.mark.parametrize("scan", [True, False])
def test_logits_match_transformers_mixed_batch(scan):
  hf = hf_llava()
  ours = ours_from(hf, scan_layers=scan)
  ids, mask, images, hf_ids, hf_mask = mixed_batch()
  with torch.no_grad():
    ref = hf(input_ids=torch.from_numpy(hf_ids), attention_mask=torch.from_numpy(hf_mask),
             pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).logits.numpy()
  logits, spliced = ours(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(images))
  assert logits.shape[1] == ids.shape[1]  # default output length = input length (truncation after expansion)
  lengths = hf_mask.sum(1)
  for b, n in enumerate(lengths):
    n = min(n, ids.shape[1])
    assert_fp32_close(logits[b, :n], ref[b, :n], err_msg=f"row {b}")
    assert np.asarray(spliced.mask[b]).sum() == n


def test_full_length_output_and_labels():
  hf = hf_llava()
  ours = ours_from(hf)
  ids, mask, images, hf_ids, hf_mask = mixed_batch()
  labels = np.where(mask > 0, ids, IGNORE_INDEX)
  labels[ids == IMAGE_TOKEN_INDEX] = IGNORE_INDEX
  out_len = hf_ids.shape[1]
  spliced = ours.embed_inputs(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(images), jnp.asarray(labels),
                              out_len=out_len)
  expected_labels = np.where((hf_mask > 0) & (hf_ids != IMAGE_TOKEN), hf_ids, IGNORE_INDEX)
  np.testing.assert_array_equal(np.asarray(spliced.labels), expected_labels)
  np.testing.assert_array_equal(np.asarray(spliced.mask), hf_mask > 0)
  with torch.no_grad():
    ref = hf(input_ids=torch.from_numpy(hf_ids), attention_mask=torch.from_numpy(hf_mask),
             pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).logits.numpy()
  hidden, _ = ours.language_model.decode(spliced.embeds, spliced.positions)
  logits = np.asarray(ours.language_model.logits(hidden))
  for b, n in enumerate(hf_mask.sum(1)):
    assert_fp32_close(logits[b, :n], ref[b, :n])


def test_text_only_batch_never_runs_vision_tower(monkeypatch):
  hf = hf_llava()
  ours = ours_from(hf)
  calls = []
  monkeypatch.setattr(type(ours), "image_features", lambda self, images: calls.append(images))
  ids = np.array([[1, 5, 6, 7], [1, 8, 9, 0]], np.int32)
  mask = (np.arange(4)[None] < np.array([[4], [3]])).astype(np.int32)
  logits, _ = ours(jnp.asarray(ids), jnp.asarray(mask), jnp.zeros((0, 28, 28, 3)))
  assert not calls
  with torch.no_grad():
    ref = hf(input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask)).logits
  assert_fp32_close(logits[0], ref[0].numpy())


def test_splice_truncates_after_expansion_and_pads_left():
  d, n = 2, 3
  ids = jnp.array([[1, IMAGE_TOKEN_INDEX, 7, 8, 0]])
  mask = jnp.array([[1, 1, 1, 1, 0]])
  text = jnp.arange(5, dtype=jnp.float32)[None, :, None] * jnp.ones((1, 5, d))
  feats = 100 + jnp.arange(n, dtype=jnp.float32)[None, :, None] * jnp.ones((1, n, d))
  labels = jnp.array([[IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX]])
  # expanded: [tok0, img0, img1, img2, tok2, tok3] -> 6 positions; out_len 5 truncates tok3.
  out = splice(ids, mask, text, feats, labels, out_len=5)
  np.testing.assert_array_equal(np.asarray(out.embeds[0, :, 0]), [0, 100, 101, 102, 2])
  np.testing.assert_array_equal(np.asarray(out.labels[0]), [IGNORE_INDEX] * 4 + [7])
  assert bool(out.mask.all())
  left = splice(ids, mask, text, feats, labels, out_len=8, pad_left=True)
  np.testing.assert_array_equal(np.asarray(left.embeds[0, :, 0]), [0, 0, 0, 100, 101, 102, 2, 3])
  np.testing.assert_array_equal(np.asarray(left.mask[0]), [0, 0, 1, 1, 1, 1, 1, 1])
  np.testing.assert_array_equal(np.asarray(left.positions[0]), [0, 0, 0, 1, 2, 3, 4, 5])


def test_bf16_compute_close_to_fp32():
  """bf16 keeps 8 mantissa bits: each rounding is <= 2^-9 relative. Along the ~40 sequential roundings of this
  model (vision 2 layers, projector, 2 LLM layers: norms, projections, residual adds) independent errors grow
  like sqrt(40) * 2^-9 ~ 1.2e-2; we allow 3e-2 of the logits' RMS, and require the error to be non-zero so the
  test proves bf16 was in use."""
  hf = hf_llava()
  ids, mask, images, _, _ = mixed_batch()
  fp32 = ours_from(hf)
  bf16 = ours_from(hf, dtype="bfloat16")
  ref, _ = fp32(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(images))
  got, spliced = bf16(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(images))
  assert got.dtype == jnp.bfloat16
  valid = np.asarray(spliced.mask)
  ref, got = np.asarray(ref, np.float32)[valid], np.asarray(got, np.float32)[valid]
  rel = np.sqrt(np.mean((got - ref) ** 2)) / np.sqrt(np.mean(ref ** 2))
  assert 0 < rel < 3e-2, rel
  assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9
