"""Instruction-data generation (LLaVA's data pipeline): `python -m llava_jax.datagen {captions,instruct} ...`.

- `captions`: image-caption pairs -> stage-1 LLaVA JSON (a brief-description request + the caption).
- `instruct`: COCO-style captions and boxes -> a text-only LLM (any OpenAI-compatible endpoint) -> stage-2 LLaVA
  JSON of one kind: multi-turn conversation, detailed description or complex reasoning.
Prompts and example lists are data files in `llava_jax/datagen/prompts/` (see the README there).
"""
