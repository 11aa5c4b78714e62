"""Reading conversion inputs: model settings from transformers / LLaVA folders, tensors, projectors."""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from llava_jax import checkpoint_io
from llava_jax.models import loaders
from llava_jax.models.config import ModelConfig, TextConfig, VisionConfig

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}
PROJECTOR_FILES = ("projector.safetensors", "mm_projector.safetensors", "mm_projector.bin")
_ORIGINAL_MARKERS = ("mm_vision_tower", "mm_projector_type", "mm_hidden_size", "mm_vision_select_layer")


class ConversionError(ValueError):
  """Inputs that cannot be converted as asked (the message names the file or setting)."""


def read_json(path: pathlib.Path) -> dict:
  if not path.exists():
    raise ConversionError(f"{path}: not found")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConversionError(f"{path}: invalid JSON ({e})") from e


def folder(path: str, what: str) -> pathlib.Path:
  p = pathlib.Path(path)
  if not p.is_dir():
    raise ConversionError(f"{what} {p}: no such folder")
  return p


def detect_layout(src: pathlib.Path) -> str:
  """'llava-hf' (LlavaForConditionalGeneration: vision_config/text_config) or 'original' (haotian-liu LLaVA:
  LLaMA fields + mm_* fields; its model_type is also 'llava')."""
  config = read_json(src / "config.json")
  if "text_config" in config or "vision_config" in config:
    return "llava-hf"
  if any(k in config for k in _ORIGINAL_MARKERS):
    return "original"
  raise ConversionError(f"{src / 'config.json'}: neither a llava-hf config (vision_config/text_config) nor an "
                        f"original LLaVA config ({'/'.join(_ORIGINAL_MARKERS)}); for a CLIP and a LLaMA folder "
                        "use `assemble`")


def image_processor_settings(path: pathlib.Path | None) -> dict:
  """image_mean / image_std (and aspect 'pad' where the processor pads to square) from preprocessor_config.json."""
  file = path / "preprocessor_config.json" if path is not None else None
  if file is None or not file.exists():
    return {}
  pre = read_json(file)
  out = {}
  for key in ("image_mean", "image_std"):
    if key in pre:
      out[key] = tuple(float(x) for x in pre[key])
  if "do_pad" in pre:
    out["image_aspect_ratio"] = "pad" if pre["do_pad"] else "square"
  return out


def clip_vision_config(path: pathlib.Path) -> VisionConfig:
  """From a CLIPModel or CLIPVisionModel folder's config.json."""
  import transformers
  config = read_json(path / "config.json")
  if config.get("model_type") not in ("clip", "clip_vision_model"):
    raise ConversionError(f"{path / 'config.json'}: model_type {config.get('model_type')!r}, expected a CLIP "
                          "model ('clip' or 'clip_vision_model')")
  hf = transformers.AutoConfig.from_pretrained(str(path))
  return VisionConfig.from_hf(getattr(hf, "vision_config", hf))


def llama_text_config(path: pathlib.Path) -> TextConfig:
  import transformers
  config = read_json(path / "config.json")
  if config.get("model_type") != "llama":
    raise ConversionError(f"{path / 'config.json'}: model_type {config.get('model_type')!r}, expected 'llama' "
                          "(LLaMA / Vicuna)")
  return TextConfig.from_hf(transformers.AutoConfig.from_pretrained(str(path)))


def hf_llava_config(src: pathlib.Path) -> ModelConfig:
  import transformers
  hf = transformers.LlavaConfig.from_pretrained(str(src))
  if hf.vision_config.model_type != "clip_vision_model":
    raise ConversionError(f"{src}: vision tower {hf.vision_config.model_type!r}; only CLIP is supported")
  if hf.text_config.model_type != "llama":
    raise ConversionError(f"{src}: language model {hf.text_config.model_type!r}; only LLaMA is supported")
  if not getattr(hf, "multimodal_projector_bias", True):
    raise ConversionError(f"{src}: multimodal_projector_bias=False is not supported (LLaVA's projector has biases)")
  settings = {"image_aspect_ratio": "square", **image_processor_settings(src)}
  return ModelConfig.from_hf_llava(hf, **settings)


def original_config(src: pathlib.Path, vision: VisionConfig) -> ModelConfig:
  """haotian-liu LLaVA config.json (LLaMA fields + mm_*); the tower's own settings come from `vision`."""
  import transformers
  config = read_json(src / "config.json")
  where = src / "config.json"
  if config.get("mm_use_im_start_end") or config.get("mm_use_im_patch_token"):
    raise ConversionError(f"{where}: mm_use_im_start_end / mm_use_im_patch_token checkpoints (extra image "
                          "tokens) are not supported")
  if config.get("mm_patch_merge_type", "flat") != "flat":
    raise ConversionError(f"{where}: mm_patch_merge_type {config['mm_patch_merge_type']!r} (LLaVA-1.6 anyres) "
                          "is not supported")
  aspect = config.get("image_aspect_ratio", "square")  # LLaVA's DataArguments default
  if aspect not in ("square", "pad"):
    raise ConversionError(f"{where}: image_aspect_ratio {aspect!r} is not supported (square | pad)")
  if "mm_hidden_size" in config and config["mm_hidden_size"] != vision.hidden_size:
    raise ConversionError(f"{where}: mm_hidden_size {config['mm_hidden_size']} but the vision tower's "
                          f"hidden_size is {vision.hidden_size}")
  if "mm_vision_select_layer" not in config:
    raise ConversionError(f"{where}: no mm_vision_select_layer")
  select = config.get("mm_vision_select_feature", "patch")
  if select not in ("patch", "cls_patch"):
    raise ConversionError(f"{where}: mm_vision_select_feature {select!r} is not supported (patch | cls_patch)")
  llama_fields = {k: v for k, v in config.items()
                  if not k.startswith("mm_") and k not in ("model_type", "architectures", "_name_or_path",
                                                           "transformers_version", "auto_map")}
  text = TextConfig.from_hf(transformers.LlamaConfig(**llama_fields))
  return ModelConfig(vision=vision, text=text, projector_type=config.get("mm_projector_type", "linear"),
                     vision_feature_layer=int(config["mm_vision_select_layer"]),
                     vision_feature_select=select,
                     image_token_id=None, image_aspect_ratio=aspect)


def check_rope_scaling(text: TextConfig, where: str) -> None:
  """Raises ConversionError unless the model computes `text.rope_scaling` (its inverse frequencies are computed
  once, as the first forward pass would)."""
  from llava_jax.models import layers
  try:
    layers.rope_inverse_frequencies(text.head_size, text.rope_theta, text.rope_scaling_dict)
  except KeyError as e:
    raise ConversionError(f"{where}: rope_scaling {text.rope_scaling_dict}: no {e} (its type needs it)") from e
  except (ValueError, TypeError) as e:  # an unsupported type (the message lists the supported ones), a bad value
    raise ConversionError(f"{where}: rope_scaling {text.rope_scaling_dict}: {e}") from e


def override(cfg: ModelConfig, **settings) -> ModelConfig:
  return dataclasses.replace(cfg, **{k: v for k, v in settings.items() if v is not None})


def has_vision_keys(view: Mapping[str, Any]) -> bool:
  return any(k.startswith("vision.") for k in view)


# --- Projectors ------------------------------------------------------------------------------------------------------

_PROJECTOR_KEY = re.compile(r"^(?:model\.)?mm_projector\.(?:(\d+)\.)?(weight|bias)$")


def projector_tensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  """Canonical {projector.i.weight|bias: torch-layout array} from a stage-1 projector file or folder.

  Accepted: a file (.bin through torch.load(weights_only=True), or .safetensors) holding LLaVA's
  `model.mm_projector.{0,2,...}.{weight,bias}` (or `model.mm_projector.{weight,bias}` for 'linear'); or a folder
  holding one of PROJECTOR_FILES (`projector.safetensors` is what the llava_jax trainer writes).
  """
  if path.is_dir():
    found = [path / n for n in PROJECTOR_FILES if (path / n).exists()]
    if not found:
      raise ConversionError(f"{path}: no projector file (looked for {', '.join(PROJECTOR_FILES)})")
    path = found[0]
  reader = checkpoint_io.open_state_dict(path)
  out, bad = {}, []
  for key in reader:
    m = _PROJECTOR_KEY.match(key)
    if not m:
      bad.append(key)
      continue
    index = int(m.group(1)) // 2 if m.group(1) is not None else 0  # Linear, GELU, Linear, ...: every other one
    out[f"projector.{index}.{m.group(2)}"] = reader[key]
  if bad:
    raise loaders.CheckpointMismatchError(f"{path}: keys that are not LLaVA projector weights "
                                          f"(model.mm_projector.*): {sorted(bad)}")
  if not out:
    raise ConversionError(f"{path}: holds no projector weights")
  return out


def fresh_projector(cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
  """A new projector initialised as torch.nn.Linear's defaults (what LLaVA stage 1 starts from): weight and
  bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), from numpy's generator seeded with `seed`. Torch layout [out, in]."""
  from llava_jax.model_folder import abstract_model
  rng = np.random.default_rng(seed)
  linears = abstract_model(cfg).projector.linears
  out = {}
  for i, linear in enumerate(linears):
    fan_in, fan_out = linear.kernel.value.shape
    bound = 1.0 / np.sqrt(fan_in)
    out[f"projector.{i}.weight"] = rng.uniform(-bound, bound, (fan_out, fan_in)).astype(np.float32)
    out[f"projector.{i}.bias"] = rng.uniform(-bound, bound, (fan_out,)).astype(np.float32)
  return out
