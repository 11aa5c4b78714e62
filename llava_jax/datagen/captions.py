"""Stage-1 data: (image, caption) pairs -> LLaVA JSON with a brief-description instruction per pair.

    python -m llava_jax.datagen captions --input PAIRS --output stage1.json [--max-samples N] [--seed 0]

PAIRS is one of
- a JSON list or JSONL of objects with the image path and the caption (`--image-key`, `--caption-key`; an `id`
  field is kept as the record id),
- a COCO captions file ({"images": [{id, file_name}], "annotations": [{id, image_id, caption}]}): one pair per
  caption, the annotation id as the record id,
- a TSV file (.tsv): `image<TAB>caption` per line, an optional header line `image<TAB>caption`.
Each pair becomes {id, image, conversations: [human: instruction with '<image>' before or after it (drawn, as
in LLaVA's released data), gpt: caption]}; the instruction is drawn from `prompts/brief_description.txt`.
Draws come from `--seed`, so a run is reproducible. Pairs with an empty caption are skipped and counted.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
from typing import Any

import numpy as np

from llava_jax.datagen import prompt_files


def _from_objects(records: list[Any], path: str, image_key: str, caption_key: str, line_numbers: bool
                  ) -> list[dict[str, str]]:
  pairs = []
  for i, r in enumerate(records):
    where = f"{path}:{i + 1}" if line_numbers else f"{path} record {i}"
    if not isinstance(r, dict) or image_key not in r or caption_key not in r:
      raise KeyError(f"{where}: needs keys {image_key!r} and {caption_key!r}")
    pairs.append({"id": str(r.get("id", f"{i:08d}")), "image": str(r[image_key]), "caption": str(r[caption_key])})
  return pairs


def read_pairs(path: str, *, image_key: str = "image", caption_key: str = "caption") -> list[dict[str, str]]:
  """[{id, image, caption}] from a JSON / JSONL / COCO captions / TSV file (see the module docstring)."""
  if path.endswith(".tsv"):
    pairs = []
    with open(path, encoding="utf-8") as f:
      for i, line in enumerate(f):
        line = line.rstrip("\n")
        if not line.strip() or (i == 0 and line.lower() == "image\tcaption"):
          continue
        fields = line.split("\t", 1)
        if len(fields) != 2:
          raise ValueError(f"{path}:{i + 1}: expected 'image<TAB>caption'")
        pairs.append({"id": f"{i:08d}", "image": fields[0], "caption": fields[1]})
    return pairs
  if path.endswith(".jsonl"):
    records = []
    with open(path, encoding="utf-8") as f:
      for i, line in enumerate(f):
        if line.strip():
          try:
            records.append(json.loads(line))
          except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i + 1}: not valid JSON ({e})") from None
    return _from_objects(records, path, image_key, caption_key, line_numbers=True)
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  if isinstance(data, dict) and "annotations" in data and "images" in data:
    files = {img["id"]: img["file_name"] for img in data["images"]}
    pairs = []
    for ann in data["annotations"]:
      if ann["image_id"] not in files:
        raise KeyError(f"{path}: caption annotation {ann.get('id')!r} names unknown image_id {ann['image_id']!r}")
      pairs.append({"id": str(ann["id"]), "image": files[ann["image_id"]], "caption": ann["caption"]})
    return pairs
  if not isinstance(data, list):
    raise ValueError(f"{path}: expected a JSON list of pairs or a COCO captions file")
  return _from_objects(data, path, image_key, caption_key, line_numbers=False)


def make_records(pairs: list[dict[str, str]], instructions: list[str], *, seed: int = 0,
                 max_samples: int | None = None, image_prefix: str = "") -> tuple[list[dict[str, Any]], dict]:
  """LLaVA records from pairs (optionally a seeded subsample, in file order); also counts."""
  rng = np.random.default_rng(seed)
  counts = collections.Counter(pairs=len(pairs))
  kept = [p for p in pairs if p["caption"].strip()]
  counts["skipped_empty_caption"] = len(pairs) - len(kept)
  if max_samples is not None and max_samples < len(kept):
    chosen = np.sort(rng.choice(len(kept), size=max_samples, replace=False))
    kept = [kept[i] for i in chosen]
  ids = collections.Counter(p["id"] for p in kept)
  duplicates = [i for i, n in ids.items() if n > 1]
  if duplicates:
    raise ValueError(f"duplicate record ids, e.g. {duplicates[:3]}")
  records = []
  for p in kept:
    instruction = instructions[rng.integers(len(instructions))]
    human = f"<image>\n{instruction}" if rng.integers(2) else f"{instruction}\n<image>"
    records.append({"id": p["id"], "image": image_prefix + p["image"],
                    "conversations": [{"from": "human", "value": human},
                                      {"from": "gpt", "value": p["caption"].strip()}]})
  counts["written"] = len(records)
  return records, dict(counts)


def add_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--input", required=True, help="pairs: .json / .jsonl / COCO captions .json / .tsv")
  parser.add_argument("--output", required=True, help="LLaVA JSON to write")
  parser.add_argument("--image-key", default="image")
  parser.add_argument("--caption-key", default="caption")
  parser.add_argument("--image-prefix", default="", help="prepended to every image path")
  parser.add_argument("--max-samples", type=int, default=None, help="seeded random subsample of this size")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--prompts-dir", default=None, help="a copy of llava_jax/datagen/prompts to use instead")


def run(args: argparse.Namespace) -> int:
  pairs = read_pairs(args.input, image_key=args.image_key, caption_key=args.caption_key)
  instructions = prompt_files.instruction_list("brief_description", args.prompts_dir)
  records, counts = make_records(pairs, instructions, seed=args.seed, max_samples=args.max_samples,
                                 image_prefix=args.image_prefix)
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  with open(args.output, "w", encoding="utf-8") as f:
    json.dump(records, f, indent=1, ensure_ascii=False)
  print(f"pairs {counts['pairs']}, skipped (empty caption) {counts['skipped_empty_caption']}, "
        f"written {counts['written']} -> {args.output}")
  return 0
