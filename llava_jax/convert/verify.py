"""`verify`: one fixed image and prompt through a llava_jax model folder and a llava-hf folder.

Both models get the same pixel array (so this checks weights and architecture, not image preprocessing) and the
same tokens: ours with one IMAGE_TOKEN_INDEX placeholder, transformers' with `image_seq_length` image tokens.
Reported over the vocabulary both models share (a to-hf folder adds '<image>', '<pad>' and padding rows):
the max |logit difference| over all positions, and KL(p_hf || p_ours) of the next-token distributions at the
last position (each softmax taken over the shared vocabulary), plus the probability the HF model puts on the
extra rows.
"""
from __future__ import annotations

import argparse
import pathlib

import numpy as np

from llava_jax import model_folder
from llava_jax.convert.sources import ConversionError
from llava_jax.models.config import IMAGE_TOKEN_INDEX, ModelConfig, RuntimeConfig


def fixed_image(cfg: ModelConfig) -> np.ndarray:
  """float32[1, S, S, 3]: a smooth colour gradient plus seeded noise in [0, 1], normalised by the image mean/std."""
  s = cfg.vision.image_size
  y, x = np.mgrid[0:s, 0:s] / max(s - 1, 1)
  rgb = np.stack([x, y, 0.5 * (x + y)], axis=-1)
  rgb = np.clip(rgb + 0.1 * np.random.default_rng(0).standard_normal(rgb.shape), 0.0, 1.0)
  return ((rgb - np.array(cfg.image_mean)) / np.array(cfg.image_std))[None].astype(np.float32)


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(ours: np.ndarray, theirs: np.ndarray) -> dict:
  """ours float[T, V1], theirs float[T, V2] -> {max_abs_diff, kl, extra_mass} over the shared V = min(V1, V2)."""
  v = min(ours.shape[-1], theirs.shape[-1])
  diff = float(np.abs(ours[:, :v].astype(np.float64) - theirs[:, :v]).max())
  log_p, log_q = _log_softmax(theirs[-1, :v]), _log_softmax(ours[-1, :v])
  kl = float(np.sum(np.exp(log_p) * (log_p - log_q)))
  extra = float(np.exp(_log_softmax(theirs[-1]))[v:].sum())
  return {"max_abs_diff": diff, "kl": kl, "extra_mass": extra, "shared_vocab": v}


def verify(args: argparse.Namespace) -> int:
  import torch
  import transformers
  hf_dir = pathlib.Path(args.hf)
  if not (hf_dir / "config.json").exists():
    raise ConversionError(f"--hf {hf_dir}: no config.json (a llava-hf folder is expected)")
  cfg = model_folder.load_config(args.ckpt)
  ours = model_folder.load_model(args.ckpt, RuntimeConfig(param_dtype=args.dtype, dtype=args.dtype))
  hf = transformers.LlavaForConditionalGeneration.from_pretrained(
      str(hf_dir), dtype=getattr(torch, args.dtype)).eval()
  image_id, n = hf.config.image_token_index, cfg.image_seq_length
  if hf.config.image_seq_length != n:
    raise ConversionError(f"{hf_dir}: image_seq_length {hf.config.image_seq_length}, {args.ckpt}: {n}")

  if args.image:
    from PIL import Image
    processor = transformers.AutoImageProcessor.from_pretrained(str(hf_dir))
    with Image.open(args.image) as im:
      pixels = processor(im.convert("RGB"), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  else:
    pixels = fixed_image(cfg)
  if model_folder.has_tokenizer(hf_dir):
    ids = transformers.AutoTokenizer.from_pretrained(str(hf_dir))(args.prompt).input_ids
    if ids.count(image_id) != 1:
      raise ConversionError(f"--prompt must hold '<image>' exactly once (token {image_id} of {hf_dir}'s "
                            f"tokenizer); found {ids.count(image_id)}")
  else:  # no tokenizer: fixed ids inside every vocabulary
    ids = [cfg.text.bos_token_id, image_id] + [(7 * i) % min(cfg.text.vocab_size, 1000) + 3 for i in range(12)]
  ours_ids = np.array([[IMAGE_TOKEN_INDEX if t == image_id else t for t in ids]], np.int32)
  hf_ids = np.array([sum(([t] * n if t == image_id else [t] for t in ids), [])], np.int64)

  our_logits = _our_logits(ours, ours_ids, pixels, hf_ids.shape[1])
  with torch.no_grad():
    their_logits = hf(input_ids=torch.from_numpy(hf_ids), attention_mask=torch.ones_like(torch.from_numpy(hf_ids)),
                      pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)).to(hf.dtype)).logits
  result = compare(our_logits, their_logits[0].float().numpy())
  ok = result["max_abs_diff"] <= args.threshold and result["kl"] <= args.kl_threshold
  print(f"{hf_ids.shape[1]} positions ({n} image), shared vocabulary {result['shared_vocab']}, {args.dtype}")
  print(f"max |logit diff| {result['max_abs_diff']:.3e} (threshold {args.threshold:g})")
  print(f"next-token KL(hf || ours) {result['kl']:.3e} (threshold {args.kl_threshold:g})")
  print(f"HF probability on tokens beyond the shared vocabulary {result['extra_mass']:.3e}")
  print("OK" if ok else "FAIL: above threshold")
  return 0 if ok else 1


def _our_logits(model, ids: np.ndarray, pixels: np.ndarray, length: int) -> np.ndarray:
  """float32[L, V] logits of one sample expanded to `length` positions."""
  import jax.numpy as jnp
  from flax import nnx

  @nnx.jit(static_argnums=3)
  def forward(model, ids, pixels, length):
    spliced = model.embed_inputs(ids, jnp.ones(ids.shape, jnp.int32), pixels, out_len=length)
    hidden, _ = model.language_model.decode(spliced.embeds, spliced.positions)
    return model.language_model.logits(hidden)[0]

  return np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(pixels), length), np.float32)
