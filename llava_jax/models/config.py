"""Model settings: plain dataclasses that round-trip through a model folder's `config.json`.

`ModelConfig` holds everything a LLaVA model folder needs: the vision tower, the projector, the LLM, the image
placeholder and feature selection, the conversation template and image preprocessing. `RuntimeConfig` holds how
the model is run (dtypes, attention kernel, remat, scan); it is not part of the saved model.
"""
from __future__ import annotations

import dataclasses
from typing import Any

IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder id for one image in `input_ids` (never a vocabulary id).
IGNORE_INDEX = -100  # label value that is not supervised.


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """CLIP vision transformer (defaults: ViT-L/14 at 336 px)."""
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_hidden_layers: int = 24
  num_attention_heads: int = 16
  image_size: int = 336
  patch_size: int = 14
  num_channels: int = 3
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @classmethod
  def from_hf(cls, hf: Any) -> "VisionConfig":
    """From a transformers `CLIPVisionConfig` (or the `vision_config` of a `CLIPConfig`)."""
    return cls(hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
               num_hidden_layers=hf.num_hidden_layers, num_attention_heads=hf.num_attention_heads,
               image_size=hf.image_size, patch_size=hf.patch_size, num_channels=hf.num_channels,
               layer_norm_eps=hf.layer_norm_eps, hidden_act=hf.hidden_act)


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """LLaMA / Vicuna decoder (defaults: LLaMA-2-7B / Vicuna-7B v1.5)."""
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int = 32
  head_dim: int | None = None
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  # e.g. {"rope_type": "llama3", "factor": 8.0, ...}; held as sorted (key, value) pairs so the config hashes.
  rope_scaling: tuple | dict | None = None
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  bos_token_id: int = 1
  eos_token_id: int | tuple[int, ...] = 2  # several for e.g. Llama-3-Instruct (<|end_of_text|>, <|eot_id|>)
  pad_token_id: int = 0

  def __post_init__(self):
    if isinstance(self.eos_token_id, (list, tuple)):  # a list after a JSON round trip
      ids = tuple(int(i) for i in self.eos_token_id)
      if not ids:
        raise ValueError("eos_token_id: an empty list")
      object.__setattr__(self, "eos_token_id", ids[0] if len(ids) == 1 else ids)
    if self.rope_scaling is not None:
      object.__setattr__(self, "rope_scaling", tuple(sorted((str(k), v) for k, v in dict(self.rope_scaling).items())))

  @property
  def rope_scaling_dict(self) -> dict | None:
    return dict(self.rope_scaling) if self.rope_scaling is not None else None

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    """Every token id that ends generation."""
    return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

  @property
  def head_size(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  @classmethod
  def from_hf(cls, hf: Any) -> "TextConfig":
    """From a transformers `LlamaConfig`."""
    rope_theta = getattr(hf, "rope_theta", None)
    rope_scaling = getattr(hf, "rope_scaling", None)
    params = getattr(hf, "rope_parameters", None)  # transformers 5 keeps theta and scaling here.
    if params:
      params = dict(params)
      rope_theta = params.get("rope_theta", rope_theta)
      if params.get("rope_type", "default") != "default":
        rope_scaling = params
      else:
        rope_scaling = None
    if rope_scaling is not None:
      rope_scaling = {k: v for k, v in dict(rope_scaling).items() if k != "rope_theta"}
      if rope_scaling.get("rope_type", rope_scaling.get("type", "default")) == "default":
        rope_scaling = None
    eos = hf.eos_token_id  # an id or a list of them
    return cls(vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
               num_hidden_layers=hf.num_hidden_layers, num_attention_heads=hf.num_attention_heads,
               num_key_value_heads=hf.num_key_value_heads or hf.num_attention_heads,
               head_dim=getattr(hf, "head_dim", None), rms_norm_eps=hf.rms_norm_eps,
               rope_theta=float(rope_theta if rope_theta is not None else 10000.0), rope_scaling=rope_scaling,
               max_position_embeddings=hf.max_position_embeddings,
               tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
               attention_bias=bool(getattr(hf, "attention_bias", False)),
               mlp_bias=bool(getattr(hf, "mlp_bias", False)),
               bos_token_id=hf.bos_token_id if hf.bos_token_id is not None else 1,
               eos_token_id=eos if eos is not None else 2,
               pad_token_id=hf.pad_token_id if hf.pad_token_id is not None else 0)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A whole LLaVA model: vision tower -> projector -> LLM, and how its inputs are made."""
  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  projector_type: str = "mlp2x_gelu"  # linear | mlp{N}x_gelu | identity
  vision_feature_layer: int = -2  # index into hidden_states (0 = embeddings after pre_layrnorm)
  vision_feature_select: str = "patch"  # patch (drop CLS) | cls_patch
  image_token_id: int | None = None  # vocabulary id of '<image>' where the tokenizer has one (llava-hf: 32000)
  template: str = "vicuna_v1"
  image_aspect_ratio: str = "pad"  # square | pad
  image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
  image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)

  @property
  def image_seq_length(self) -> int:
    """Number of LLM positions one image takes."""
    return self.vision.num_patches + (1 if self.vision_feature_select == "cls_patch" else 0)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["text"]["rope_scaling"] = self.text.rope_scaling_dict
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "ModelConfig":
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f"unknown model config fields: {sorted(unknown)}")
    vision = VisionConfig(**d.pop("vision", {}))
    text = TextConfig(**d.pop("text", {}))
    for k in ("image_mean", "image_std"):
      if k in d:
        d[k] = tuple(d[k])
    return cls(vision=vision, text=text, **d)

  @classmethod
  def from_hf_llava(cls, hf: Any, **overrides) -> "ModelConfig":
    """From a transformers `LlavaConfig` (llava-hf layout)."""
    strategy = hf.vision_feature_select_strategy
    if strategy not in ("default", "full"):
      raise ValueError(f"unsupported vision_feature_select_strategy {strategy!r}")
    layer = hf.vision_feature_layer
    if isinstance(layer, (list, tuple)):
      raise ValueError("multi-layer vision features are not supported")
    act = getattr(hf, "projector_hidden_act", "gelu")
    if act != "gelu":
      raise ValueError(f"unsupported projector_hidden_act {act!r} (LLaVA uses exact gelu)")
    text = TextConfig.from_hf(hf.text_config)
    # transformers 5 ties LlavaForConditionalGeneration's lm_head to the embeddings when the top-level
    # LlavaConfig.tie_word_embeddings is set (LlavaConfig sets it when text_config's is): a tied checkpoint saves
    # no lm_head, whatever text_config says.
    tie = bool(getattr(hf, "tie_word_embeddings", False) or text.tie_word_embeddings)
    kw = dict(vision=VisionConfig.from_hf(hf.vision_config), text=dataclasses.replace(text, tie_word_embeddings=tie),
              projector_type="mlp2x_gelu", vision_feature_layer=int(layer),
              vision_feature_select="patch" if strategy == "default" else "cls_patch",
              image_token_id=hf.image_token_index)
    kw.update(overrides)
    return cls(**kw)


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
  """How a model runs: not saved with the weights."""
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype
  attention_impl: str | None = None  # 'xla' | 'cudnn' | None (cudnn on GPU in bf16/fp16, else xla)
  remat_policy: str = "none"  # none | full | dots | dots_with_no_batch_dims | save_attn_out
  scan_layers: bool = True
  # Recompute RMSNorm and the SwiGLU product in the backward pass (saving only their bf16 inputs) instead of
  # keeping their float32 and intermediate values for it: less activation memory and traffic, same math.
  recompute_elementwise: bool = True
