"""`to-hf`: a llava_jax model folder -> a llava-hf folder for `transformers.LlavaForConditionalGeneration`.

The image token and vocabulary follow llava-hf's conversion of LLaVA-1.5 (transformers'
`convert_llava_weights_to_hf.py`): a model without '<image>' in its tokenizer (an original-layout or assembled
model, vocabulary 32000) gets '<image>' (id 32000) and the pad token '<pad>' (32001) added to the tokenizer, and
its embedding and LM-head matrices grow to the next multiple of 64 (32064). Every new row, of both matrices, is
drawn from N(mean of the embedding rows, 1e-5 x their covariance), as llava-hf did; here from numpy's generator
seeded with --seed. The added rows only matter for predicting the new tokens: image positions take the projected
image features, not the '<image>' embedding. A model that already has '<image>' (from a llava-hf folder) is
written back unchanged.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import shutil
import time
from typing import Any, Iterator

import numpy as np

from llava_jax import checkpoint_io, model_folder
from llava_jax.convert import sources
from llava_jax.convert.sources import ConversionError
from llava_jax.models import loaders
from llava_jax.models.config import ModelConfig

IMAGE_TOKEN, PAD_TOKEN, PAD_MULTIPLE = "<image>", "<pad>", 64
_SYSTEMS = {
    "vicuna_v1": "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.",
    "llava_v1": "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the human's questions.",
}
_SYSTEMS["v1"] = _SYSTEMS["vicuna_v1"]

# LLaVA's SeparatorStyle.TWO (vicuna_v1 / llava_v1): "SYSTEM USER: <image>\nQ ASSISTANT: A</s>USER: ...". A
# message's content is a string or a list of {"type": "image"} / {"type": "text", "text": ...} (images first, as
# LLaVA's preprocess_multimodal puts them); a leading "system" message replaces the default system prompt.
_CHAT_TEMPLATE = (
    "{%- set system = '@SYSTEM@' -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] if messages[0]['content'] is string "
    "else messages[0]['content'][0]['text'] -%}{%- endif -%}"
    "{{- system + ' ' -}}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{{- 'USER: ' if message['role'] == 'user' else 'ASSISTANT: ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{- '<image>\\n' -}}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{- part['text'] -}}{%- endfor -%}"
    "{%- endif -%}"
    "{{- ' ' if message['role'] == 'user' else '</s>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}")


def chat_template(template: str) -> str | None:
  """A Jinja chat template equal to LLaVA's prompt format, for the two-separator Vicuna templates."""
  system = _SYSTEMS.get(template)
  return None if system is None else _CHAT_TEMPLATE.replace("@SYSTEM@", system.replace("'", "\\'"))


@dataclasses.dataclass
class VocabPlan:
  tokenizer: Any  # transformers tokenizer to write, or None
  image_token_id: int
  pad_token_id: int | None
  vocab_size: int  # rows of the written embedding / LM head


def plan_vocab(cfg: ModelConfig, tokenizer: Any, where: str) -> VocabPlan:
  """Where '<image>' and '<pad>' go, and the written vocabulary size (see the module docstring)."""
  import transformers
  v = cfg.text.vocab_size
  if cfg.image_token_id is not None:  # already llava-hf style
    if tokenizer is not None:
      got = tokenizer.get_vocab().get(IMAGE_TOKEN)
      if got != cfg.image_token_id:
        raise ConversionError(f"{where}: config image_token_id {cfg.image_token_id} but the tokenizer has "
                              f"'{IMAGE_TOKEN}' at {got}")
      if len(tokenizer) > v:
        raise ConversionError(f"{where}: tokenizer has {len(tokenizer)} tokens, the embeddings {v} rows")
    pad = tokenizer.pad_token_id if tokenizer is not None else cfg.text.pad_token_id
    return VocabPlan(tokenizer, cfg.image_token_id, pad, v)
  if tokenizer is None:
    return VocabPlan(None, v, v + 1, math.ceil((v + 2) / PAD_MULTIPLE) * PAD_MULTIPLE)
  if IMAGE_TOKEN in tokenizer.get_vocab():
    raise ConversionError(f"{where}: the tokenizer has '{IMAGE_TOKEN}' but the model config has no "
                          "image_token_id; fix config.json's model.image_token_id")
  tokenizer.add_tokens(transformers.AddedToken(IMAGE_TOKEN, special=True, normalized=False), special_tokens=True)
  tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
  image = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
  size = math.ceil(max(v, len(tokenizer)) / PAD_MULTIPLE) * PAD_MULTIPLE
  return VocabPlan(tokenizer, image, tokenizer.pad_token_id, size)


def hf_config(cfg: ModelConfig, plan: VocabPlan, dtype: np.dtype):
  """transformers.LlavaConfig of the written model; checked to read back as `cfg` (new vocabulary aside, the rope
  scaling type under 'rope_type'), else ConversionError naming the settings that differ."""
  import transformers
  if cfg.projector_type != "mlp2x_gelu":
    raise ConversionError(f"projector_type {cfg.projector_type!r}: llava-hf's LlavaMultiModalProjector is "
                          "Linear-GELU-Linear (mlp2x_gelu) only")
  v, t = cfg.vision, cfg.text
  scaling = _rope_scaling(t.rope_scaling_dict)
  rope = {"rope_type": "default", **(scaling or {}), "rope_theta": t.rope_theta}
  text = transformers.LlamaConfig(
      vocab_size=plan.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
      num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
      num_key_value_heads=t.num_key_value_heads, head_dim=t.head_size, rms_norm_eps=t.rms_norm_eps,
      rope_parameters=rope, max_position_embeddings=t.max_position_embeddings,
      tie_word_embeddings=t.tie_word_embeddings, attention_bias=t.attention_bias, mlp_bias=t.mlp_bias,
      bos_token_id=t.bos_token_id, pad_token_id=plan.pad_token_id,
      eos_token_id=list(t.eos_token_ids) if len(t.eos_token_ids) > 1 else t.eos_token_ids[0])
  vision = transformers.CLIPVisionConfig(
      hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
      num_attention_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size,
      num_channels=v.num_channels, layer_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act)
  config = transformers.LlavaConfig(
      vision_config=vision, text_config=text, image_token_index=plan.image_token_id,
      image_seq_length=cfg.image_seq_length, projector_hidden_act="gelu",
      vision_feature_select_strategy="default" if cfg.vision_feature_select == "patch" else "full",
      vision_feature_layer=cfg.vision_feature_layer, multimodal_projector_bias=True,
      tie_word_embeddings=t.tie_word_embeddings)
  config.architectures = ["LlavaForConditionalGeneration"]
  config.dtype = str(dtype)
  expected = dataclasses.replace(cfg, image_token_id=plan.image_token_id, text=dataclasses.replace(
      t, vocab_size=plan.vocab_size, pad_token_id=plan.pad_token_id if plan.pad_token_id is not None else 0,
      head_dim=t.head_size, rope_scaling=scaling))
  back = ModelConfig.from_hf_llava(config, template=cfg.template, image_aspect_ratio=cfg.image_aspect_ratio,
                                   image_mean=cfg.image_mean, image_std=cfg.image_std)
  back = dataclasses.replace(back, text=dataclasses.replace(back.text, head_dim=back.text.head_size))
  if back != expected:
    raise ConversionError(f"settings that transformers' LlavaConfig cannot hold (the llava-hf config reads back "
                          f"otherwise): {_differences(back, expected)}")
  return config


def _rope_scaling(scaling: dict | None) -> dict | None:
  """`scaling` with its type under 'rope_type' (transformers 5's key; older configs say 'type')."""
  if not scaling:
    return None
  scaling = dict(scaling)
  kind = scaling.pop("type", None)
  return {**scaling, "rope_type": scaling.get("rope_type", kind)}


def _differences(got: ModelConfig, expected: ModelConfig) -> str:
  """'text.rope_scaling: model X, llava-hf Y; ...' over the settings where the two configs differ."""
  sections = [("", got, expected), ("vision.", got.vision, expected.vision), ("text.", got.text, expected.text)]
  return "; ".join(f"{prefix}{f.name}: model {getattr(e, f.name)!r}, llava-hf {getattr(g, f.name)!r}"
                   for prefix, g, e in sections for f in dataclasses.fields(e)
                   if not dataclasses.is_dataclass(getattr(e, f.name)) and getattr(g, f.name) != getattr(e, f.name))


def image_processor(cfg: ModelConfig):
  """CLIPImageProcessor (square), or LlavaImageProcessor with do_pad (LLaVA's expand2square, background
  int(mean * 255)) for 'pad'; bicubic resize of the shortest edge and a center crop to the tower's size."""
  import transformers
  s = cfg.vision.image_size
  common = dict(do_resize=True, size={"shortest_edge": s}, resample=3, do_center_crop=True,
                crop_size={"height": s, "width": s}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                image_mean=list(cfg.image_mean), image_std=list(cfg.image_std), do_convert_rgb=True)
  if cfg.image_aspect_ratio == "pad":
    return transformers.LlavaImageProcessor(do_pad=True, **common)
  return transformers.CLIPImageProcessor(**common)


def _hf_key(canonical: str) -> str:
  """Canonical key -> llava-hf on-disk name (read by transformers 4.x and 5)."""
  part, rest = canonical.split(".", 1)
  if part == "vision":
    return "vision_tower.vision_model." + rest
  if part == "projector":
    index, leaf = rest.split(".", 1)
    return f"multi_modal_projector.linear_{int(index) + 1}.{leaf}"
  return "language_model." + rest  # llm.model.* / llm.lm_head.*


def _row_sampler(embedding: np.ndarray, rng: np.random.Generator):
  """count -> `count` samples of N(mean row, 1e-5 x covariance of the rows) (llava-hf's initialisation)."""
  rows = embedding.astype(np.float64)
  mu = rows.mean(0)
  centered = rows - mu
  cov = 1e-5 * (centered.T @ centered / rows.shape[0])
  del rows, centered
  try:
    np.linalg.cholesky(cov)
    method = "cholesky"
  except np.linalg.LinAlgError:  # singular covariance (fewer rows than dimensions)
    method = "eigh"
  return lambda count: rng.multivariate_normal(mu, cov, size=count, method=method)


def hf_tensors(cfg: ModelConfig, params: dict, plan: VocabPlan, seed: int) -> Iterator[tuple[str, np.ndarray]]:
  """(llava-hf key, torch-layout array) for every parameter, the vocabulary grown to `plan.vocab_size`."""
  model = model_folder.abstract_model(cfg)
  flat = {}
  for path in loaders.param_shapes(model):
    node = params
    for p in path:
      node = node[str(p)]
    flat[path] = node
  rng = np.random.default_rng(seed)
  extra = plan.vocab_size - cfg.text.vocab_size
  sample = None
  for key, array in loaders.export_tensors(flat, model):
    if extra and key in ("llm.model.embed_tokens.weight", "llm.lm_head.weight"):
      if sample is None:
        sample = _row_sampler(np.asarray(flat[("language_model", "embed_tokens", "embedding")]), rng)
      array = np.concatenate([array, sample(extra).astype(array.dtype)])
    yield _hf_key(key), array


def to_hf(args: argparse.Namespace) -> int:
  start = time.time()
  ckpt = args.ckpt
  cfg = model_folder.load_config(ckpt)
  out = pathlib.Path(args.output)
  if out.exists() and not args.overwrite:
    raise ConversionError(f"{out} already exists (pass --overwrite to replace it)")
  tokenizer = model_folder.load_tokenizer(ckpt) if model_folder.has_tokenizer(ckpt) else None
  plan = plan_vocab(cfg, tokenizer, str(ckpt))
  dtype = sources.DTYPES[args.dtype] if args.dtype else None
  params = model_folder.load_numpy_params(ckpt, dtype)
  saved_dtype = np.asarray(params["language_model"]["norm"]["weight"]).dtype
  config = hf_config(cfg, plan, saved_dtype)

  tmp = out.parent / f".{out.name}.tmp"
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.mkdir(parents=True)
  try:
    files = checkpoint_io.write_sharded_safetensors(hf_tensors(cfg, params, plan, args.seed), tmp,
                                                    max_shard_bytes=checkpoint_io.parse_size(args.max_shard_size))
    config.save_pretrained(str(tmp))
    processor = image_processor(cfg)
    if plan.tokenizer is not None:
      import transformers
      transformers.LlavaProcessor(
          image_processor=processor, tokenizer=plan.tokenizer, patch_size=cfg.vision.patch_size,
          vision_feature_select_strategy=config.vision_feature_select_strategy,
          chat_template=chat_template(cfg.template), image_token=IMAGE_TOKEN,
          num_additional_image_tokens=1).save_pretrained(str(tmp))
    else:
      processor.save_pretrained(str(tmp))
      print(f"warning: {ckpt} has no tokenizer; none written. '{IMAGE_TOKEN}' must be id {plan.image_token_id}")
    if out.exists():
      shutil.rmtree(out)
    tmp.rename(out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  print(f"wrote {out}: {', '.join(files)}; vocab {cfg.text.vocab_size} -> {plan.vocab_size}, image token "
        f"{plan.image_token_id}, pad {plan.pad_token_id}, dtype {saved_dtype}, {time.time() - start:.1f}s")
  return 0
