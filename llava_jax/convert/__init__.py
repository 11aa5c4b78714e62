"""Weight conversion: `python -m llava_jax.convert {from-hf,assemble,to-hf,verify} ...`.

  from-hf SRC --output DIR [--dtype float32|bfloat16|float16] [--vision CLIP_DIR] [--tokenizer DIR]
      A LLaVA checkpoint folder (llava-hf, or original haotian-liu layout with or without vision-tower weights;
      model.safetensors, sharded safetensors + index, or pytorch_model*.bin) -> a llava_jax model folder.
  assemble --vision CLIP_DIR --llm LLM_DIR [--projector FILE_OR_DIR] [--projector-type mlp2x_gelu]
           [--select-layer -2] --output DIR
      CLIP + LLaMA/Vicuna (+ a stage-1 projector, else a fresh one) -> a model folder (stage-1 / stage-2 start).
  to-hf CKPT --output DIR [--max-shard-size 5GB]
      A model folder -> a llava-hf folder that transformers.LlavaForConditionalGeneration loads.
  verify CKPT --hf HF_DIR [--threshold 1e-2] [--kl-threshold 1e-4]
      Both models on one fixed image and prompt; exit status 1 above a threshold.

Exit status: 0 success, 1 verify over threshold, 2 bad input (the message names the file / key).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from llava_jax import checkpoint_io
from llava_jax.convert.sources import DTYPES, ConversionError
from llava_jax.model_folder import ModelFolderError
from llava_jax.models.loaders import CheckpointMismatchError

INPUT_ERRORS = (ConversionError, ModelFolderError, CheckpointMismatchError, checkpoint_io.CheckpointFormatError)


def _model_settings(p: argparse.ArgumentParser) -> None:
  p.add_argument("--template", help="conversation template stored in the model folder (default: vicuna_v1; "
                 "assemble without --projector: plain)")
  p.add_argument("--image-aspect-ratio", choices=("square", "pad"),
                 help="image preprocessing stored in the model folder (default: from the source)")


def _output(p: argparse.ArgumentParser) -> None:
  p.add_argument("--output", required=True, help="folder to create")
  p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m llava_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("from-hf", help="LLaVA checkpoint (llava-hf or original layout) -> model folder")
  p.add_argument("src", help="checkpoint folder (config.json + weights)")
  _output(p)
  p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="parameter dtype written")
  p.add_argument("--vision", help="CLIP folder: the tower's config (original layout) and its weights when the "
                 "checkpoint has none")
  p.add_argument("--tokenizer", help="tokenizer folder, when SRC has no tokenizer files")
  _model_settings(p)

  p = sub.add_parser("assemble", help="CLIP + LLaMA (+ projector) -> model folder")
  p.add_argument("--vision", required=True, help="CLIPModel / CLIPVisionModel folder")
  p.add_argument("--llm", required=True, help="LlamaForCausalLM folder (with its tokenizer)")
  p.add_argument("--projector", help="stage-1 projector: mm_projector.bin / .safetensors with model.mm_projector.* "
                 "keys, or a folder holding projector.safetensors or mm_projector.bin; default: a fresh one")
  p.add_argument("--projector-type", default="mlp2x_gelu", help="linear | mlp{N}x_gelu | identity")
  p.add_argument("--select-layer", type=int, default=-2, help="vision hidden state fed to the projector")
  p.add_argument("--select-feature", choices=("patch", "cls_patch"), default="patch")
  p.add_argument("--seed", type=int, default=0, help="seed of a fresh projector")
  p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
  p.add_argument("--tokenizer", help="tokenizer folder (default: the --llm folder)")
  _output(p)
  _model_settings(p)

  p = sub.add_parser("to-hf", help="model folder -> llava-hf folder (transformers)")
  p.add_argument("ckpt", help="llava_jax model folder")
  _output(p)
  p.add_argument("--dtype", choices=sorted(DTYPES), help="dtype of the written tensors (default: as saved)")
  p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB")
  p.add_argument("--seed", type=int, default=0, help="seed for the rows added to the embeddings / LM head")

  p = sub.add_parser("verify", help="compare a model folder with a llava-hf folder")
  p.add_argument("ckpt", help="llava_jax model folder")
  p.add_argument("--hf", required=True, help="llava-hf folder (LlavaForConditionalGeneration)")
  p.add_argument("--image", help="image file (processed by the HF folder's image processor); default: a fixed "
                 "synthetic image")
  p.add_argument("--prompt", default="USER: <image>\nWhat is shown in this image? ASSISTANT:")
  p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype both models run in")
  p.add_argument("--threshold", type=float, default=1e-2, help="largest allowed max |logit difference|")
  p.add_argument("--kl-threshold", type=float, default=1e-4, help="largest allowed next-token KL")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    if args.command in ("from-hf", "assemble"):
      from llava_jax.convert import from_hf
      return from_hf.from_hf(args) if args.command == "from-hf" else from_hf.assemble(args)
    if args.command == "to-hf":
      from llava_jax.convert import to_hf
      return to_hf.to_hf(args)
    from llava_jax.convert import verify
    return verify.verify(args)
  except INPUT_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
