"""`from-hf` and `assemble`: PyTorch checkpoints -> a llava_jax model folder, one source tensor at a time."""
from __future__ import annotations

import argparse
import pathlib
import time
from typing import Any, Mapping

import jax
import numpy as np

from llava_jax import checkpoint_io, model_folder
from llava_jax.convert import sources
from llava_jax.convert.sources import ConversionError
from llava_jax.models import loaders
from llava_jax.models.config import ModelConfig


def write_folder(output: str, cfg: ModelConfig, tensors: Mapping[str, Any], *, dtype: str,
                 tokenizer_dir: pathlib.Path | None, extra: dict, overwrite: bool) -> None:
  """Builds the parameters from canonical-named tensors (read one at a time) and saves the model folder.

  Peak memory: the output parameters (allocated once, in `dtype`) plus one source tensor.
  """
  out = pathlib.Path(output)
  if out.exists() and not overwrite:
    raise ConversionError(f"{out} already exists (pass --overwrite to replace it)")
  if not out.parent.is_dir():
    raise ConversionError(f"{out.parent}: no such folder (parent of --output)")
  start = time.time()
  model = model_folder.abstract_model(cfg)
  params = loaders.load_params(model, tensors, dtype=sources.DTYPES[dtype])
  checkpoint_io.release_cache()
  count = sum(np.size(v) for v in jax.tree.leaves(params))
  read_s = time.time() - start
  model_folder.save_model_folder(out, cfg, params, tokenizer_source_dir=tokenizer_dir,
                                 extra={"source": extra}, overwrite=overwrite)
  print(f"wrote {out}: {count / 1e6:.1f}M parameters ({dtype}), tokenizer: "
        f"{tokenizer_dir if tokenizer_dir else 'none'}; read+convert {read_s:.1f}s, write "
        f"{time.time() - start - read_s:.1f}s")
  print(f"  projector {cfg.projector_type}, vision layer {cfg.vision_feature_layer} ({cfg.vision_feature_select}), "
        f"template {cfg.template}, image_aspect_ratio {cfg.image_aspect_ratio}, "
        f"image_token_id {cfg.image_token_id}, vocab {cfg.text.vocab_size}")


def _tokenizer_dir(*candidates: str | pathlib.Path | None) -> pathlib.Path | None:
  for c in candidates:
    if c is not None and model_folder.has_tokenizer(c):
      return pathlib.Path(c)
  return None


def from_hf(args: argparse.Namespace) -> int:
  src = sources.folder(args.src, "checkpoint")
  layout = sources.detect_layout(src)
  reader = checkpoint_io.open_state_dict(src)
  view = loaders.canonical_tensors(reader, "llava")
  vision_dir = sources.folder(args.vision, "--vision") if args.vision else None
  if layout == "llava-hf":
    if vision_dir is not None:
      raise ConversionError(f"{src} is a llava-hf checkpoint, which carries its vision tower; --vision is only "
                            "for the original LLaVA layout")
    cfg = sources.hf_llava_config(src)
    tensors = view
  else:
    if vision_dir is None:
      raise ConversionError(f"{src} is an original-layout LLaVA checkpoint: its config.json names the vision "
                            "tower only; give the CLIP folder with --vision")
    cfg = sources.original_config(src, sources.clip_vision_config(vision_dir))
    settings = sources.image_processor_settings(vision_dir)
    cfg = sources.override(cfg, image_mean=settings.get("image_mean"), image_std=settings.get("image_std"))
    if sources.has_vision_keys(view):
      tensors = view  # tuned tower weights inside the checkpoint win; --vision gives the tower's config
      print(f"vision tower weights: from {src} (config from {vision_dir})")
    else:
      tensors = loaders.MergedView(view, loaders.canonical_tensors(checkpoint_io.open_state_dict(vision_dir),
                                                                    "clip"))
      print(f"vision tower weights: from {vision_dir}")
  sources.check_rope_scaling(cfg.text, str(src / "config.json"))
  cfg = sources.override(cfg, template=args.template or "vicuna_v1", image_aspect_ratio=args.image_aspect_ratio)
  tokenizer_dir = _tokenizer_dir(src, args.tokenizer)
  if args.tokenizer and tokenizer_dir is None:
    raise ConversionError(f"--tokenizer {args.tokenizer}: no tokenizer files there")
  print(f"reading {reader.describe()} ({layout} layout, {len(reader)} tensors)")
  write_folder(args.output, cfg, tensors, dtype=args.dtype, tokenizer_dir=tokenizer_dir, overwrite=args.overwrite,
               extra={"command": "from-hf", "src": str(src.resolve()), "layout": layout,
                      "vision": str(vision_dir.resolve()) if vision_dir else None})
  return 0


def assemble(args: argparse.Namespace) -> int:
  vision_dir = sources.folder(args.vision, "--vision")
  llm_dir = sources.folder(args.llm, "--llm")
  stage2 = args.projector is not None
  settings = sources.image_processor_settings(vision_dir)
  cfg = ModelConfig(
      vision=sources.clip_vision_config(vision_dir), text=sources.llama_text_config(llm_dir),
      projector_type=args.projector_type, vision_feature_layer=args.select_layer,
      vision_feature_select=args.select_feature, image_token_id=None,
      # LLaVA-1.5's scripts: stage 1 (fresh projector) uses 'plain' and square images, stage 2 vicuna_v1 and pad.
      template=args.template or ("vicuna_v1" if stage2 else "plain"),
      image_aspect_ratio=args.image_aspect_ratio or ("pad" if stage2 else "square"),
      **{k: v for k, v in settings.items() if k in ("image_mean", "image_std")})
  sources.check_rope_scaling(cfg.text, str(llm_dir / "config.json"))
  try:
    model_folder.abstract_model(cfg)
  except ValueError as e:  # unknown projector type, select layer out of range, identity with unequal widths
    raise ConversionError(str(e)) from e
  if stage2:
    projector = sources.projector_tensors(pathlib.Path(args.projector))
    print(f"projector: {args.projector}")
  else:
    projector = sources.fresh_projector(cfg, args.seed)
    print(f"projector: fresh {cfg.projector_type} (torch.nn.Linear default init, seed {args.seed})")
  tensors = loaders.MergedView(
      loaders.canonical_tensors(checkpoint_io.open_state_dict(vision_dir), "clip"),
      loaders.canonical_tensors(checkpoint_io.open_state_dict(llm_dir), "llama"),
      projector)
  tokenizer_dir = _tokenizer_dir(args.tokenizer or llm_dir)
  if args.tokenizer and tokenizer_dir is None:
    raise ConversionError(f"--tokenizer {args.tokenizer}: no tokenizer files there")
  write_folder(args.output, cfg, tensors, dtype=args.dtype, tokenizer_dir=tokenizer_dir, overwrite=args.overwrite,
               extra={"command": "assemble", "vision": str(vision_dir.resolve()), "llm": str(llm_dir.resolve()),
                      "projector": str(pathlib.Path(args.projector).resolve()) if stage2 else f"fresh:{args.seed}"})
  return 0
