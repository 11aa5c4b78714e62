"""Test helpers for generation: tiny random llava-hf models (transformers), their conversion into model folders,
and transformers' greedy `generate` as the reference. Used by tests/test_generate.py, tests/test_chat.py and
tests/eval/test_answer.py; not imported by the library."""
from __future__ import annotations

import pathlib

import numpy as np
import torch
import transformers
from PIL import Image

from llava_jax.models.config import IMAGE_TOKEN_INDEX

IMAGE_SIZE, N_PATCHES = 28, 4  # 28 px / 14 px patches -> 4 image positions


def tiny_hf_llava(vocab_size: int = 100, image_token: int = 99, seed: int = 0):
  """A random llava-hf model (transformers), fp32, eval mode: CLIP 3 x 32, LLaMA 2 x 48 with 2 KV heads."""
  torch.manual_seed(seed)
  cfg = transformers.LlavaConfig(
      vision_config=transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                  num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=14),
      text_config=transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=48, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           max_position_embeddings=256),
      image_token_index=image_token, vision_feature_layer=-2, vision_feature_select_strategy="default",
      projector_hidden_act="gelu", image_seq_length=N_PATCHES)
  return transformers.LlavaForConditionalGeneration(cfg).eval()


def convert_to_folder(hf, folder: pathlib.Path, tokenizer_dir) -> pathlib.Path:
  """save_pretrained -> `python -m llava_jax.convert from-hf` (vicuna_v1, pad) -> the model folder's path."""
  from llava_jax import convert
  folder = pathlib.Path(folder)
  hf.save_pretrained(folder / "hf")
  argv = ["from-hf", str(folder / "hf"), "--output", str(folder / "model"), "--tokenizer", str(tokenizer_dir),
          "--template", "vicuna_v1", "--image-aspect-ratio", "pad"]
  if convert.main(argv) != 0:
    raise RuntimeError(f"from-hf failed: {argv}")
  return folder / "model"


def tokenizer_model_folder(folder: pathlib.Path, tokenizer_dir, seed: int = 1):
  """(transformers model, model folder) with the LLaMA vocabulary (+ llava-hf's '<image>' at 32000)."""
  hf = tiny_hf_llava(vocab_size=32001, image_token=32000, seed=seed)
  return hf, convert_to_folder(hf, folder, tokenizer_dir)


def random_image(seed: int, size: tuple[int, int] = (36, 20)) -> Image.Image:
  """Random RGB PIL image of size (width, height)."""
  return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (size[1], size[0], 3), np.uint8))


def hf_greedy(hf, requests, max_new_tokens: int) -> list[list[int]]:
  """transformers' greedy `generate` on a left-padded batch of `generate.Request`s (each placeholder expanded to
  the image token); each row up to and including the first EOS token."""
  image_token = hf.config.image_token_index
  n_patches = hf.config.image_seq_length
  rows = [np.concatenate([[image_token] * n_patches if t == IMAGE_TOKEN_INDEX else [t] for t in r.input_ids])
          for r in requests]
  length = max(len(r) for r in rows)
  ids = np.zeros((len(rows), length), np.int64)
  mask = np.zeros((len(rows), length), np.int64)
  for i, r in enumerate(rows):
    ids[i, length - len(r):], mask[i, length - len(r):] = r, 1
  images = [r.images for r in requests if r.images is not None]
  pixels = torch.from_numpy(np.concatenate(images).transpose(0, 3, 1, 2)) if images else None
  with torch.no_grad():
    out = hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), pixel_values=pixels,
                      max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=False, num_beams=1)
  eos = hf.config.text_config.eos_token_id
  result = []
  for row in out[:, length:].tolist():
    result.append(row[:row.index(eos) + 1] if eos in row else row)
  return result
