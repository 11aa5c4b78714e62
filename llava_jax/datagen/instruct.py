"""Stage-2 data: per image, captions and boxes -> an LLM -> one LLaVA conversation of the chosen kind.

    python -m llava_jax.datagen instruct --captions captions_train2017.json [--instances instances_train2017.json]
        --kind conversation|detail|complex --output OUT.json --base-url URL --model MODEL [--max-images N]

Inputs are COCO annotation files: captions ({images, annotations: [{image_id, caption}]}) and, for kinds that
use boxes (`prompts/kinds.json`), instances ({images, annotations: [{image_id, bbox: [x, y, w, h],
category_id}], categories}). Boxes become (x1, y1, x2, y2) normalised by the image size and rounded to 3
decimals. Images without a caption are skipped and counted.

The request for an image is the kind's system message, its few-shot examples and the image's context (see
`prompts/README.md`); the reply is parsed into LLaVA turns ('<image>' on the first question, before or after
it as drawn for the image). Progress goes to OUT.json.records.jsonl (one record per image, appended as replies
arrive) and unparseable replies to OUT.json.malformed.jsonl with the reason; both are skipped by the next run,
so an interrupted run resumes without repeating finished images (delete lines from the malformed file to
retry them). Requests that fail for good are counted and left for the next run (exit status 1). At the end
OUT.json holds every record in input order, and the counts (records, malformed, requests, tokens) are printed.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import random
import re
import sys
from typing import Any

from absl import logging

from llava_jax import llm_client
from llava_jax.datagen import prompt_files


@dataclasses.dataclass(frozen=True)
class ImageContext:
  image_id: Any
  file_name: str
  captions: tuple[str, ...]
  boxes: tuple[tuple[str, tuple[float, float, float, float]], ...]  # (category, (x1, y1, x2, y2) in [0, 1])


def _load_json(path: str) -> dict[str, Any]:
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
    raise ValueError(f"{path}: not a COCO annotation file (needs 'images' and 'annotations')")
  return data


def load_coco(captions_path: str, instances_path: str | None = None) -> tuple[list[ImageContext], dict[str, int]]:
  """Images (in the captions file's order) with their captions and normalised boxes; also counts."""
  caps = _load_json(captions_path)
  images = {img["id"]: img for img in caps["images"]}
  captions = collections.defaultdict(list)
  for ann in caps["annotations"]:
    if ann["image_id"] not in images:
      raise KeyError(f"{captions_path}: caption {ann.get('id')!r} names unknown image_id {ann['image_id']!r}")
    captions[ann["image_id"]].append(ann["caption"].strip())
  boxes = collections.defaultdict(list)
  if instances_path:
    inst = _load_json(instances_path)
    names = {c["id"]: c["name"] for c in inst.get("categories", [])}
    sizes = {img["id"]: (img["width"], img["height"]) for img in inst["images"]}
    for ann in inst["annotations"]:
      where = f"{instances_path}: annotation {ann.get('id')!r}"
      if ann["category_id"] not in names:
        raise KeyError(f"{where}: unknown category_id {ann['category_id']!r}")
      if ann["image_id"] not in sizes:
        raise KeyError(f"{where}: unknown image_id {ann['image_id']!r}")
      w, h = sizes[ann["image_id"]]
      x, y, bw, bh = ann["bbox"]
      box = tuple(round(v, 3) for v in (x / w, y / h, (x + bw) / w, (y + bh) / h))
      boxes[ann["image_id"]].append((names[ann["category_id"]], box))
  out, no_caption = [], 0
  for image_id, img in images.items():
    if not captions[image_id]:
      no_caption += 1
      continue
    out.append(ImageContext(image_id, img["file_name"], tuple(captions[image_id]), tuple(boxes[image_id])))
  return out, {"images": len(images), "skipped_no_caption": no_caption}


def context_text(image: ImageContext, use_boxes: bool) -> str:
  """Captions one per line; with boxes, a blank line then 'category: [x1, y1, x2, y2]' lines."""
  text = "\n".join(image.captions)
  if use_boxes and image.boxes:
    text += "\n\n" + "\n".join(f"{name}: {json.dumps(list(box))}" for name, box in image.boxes)
  return text


class MalformedReply(ValueError):
  """A reply that cannot be turned into a conversation."""


_BLOCK_SEPARATOR = re.compile(r"^[ \t]*===[ \t]*$", re.MULTILINE)
_BLOCK = re.compile(r"^(Question|Answer)\s*:\s*(.*)$", re.DOTALL | re.IGNORECASE)


def parse_qa(reply: str) -> list[tuple[str, str]]:
  """'Question:' / 'Answer:' blocks separated by '===' lines -> [(question, answer)] (see prompts/README.md)."""
  blocks = [b.strip() for b in _BLOCK_SEPARATOR.split(reply) if b.strip()]
  if not blocks:
    raise MalformedReply("empty reply")
  pairs, question = [], None
  for i, block in enumerate(blocks):
    m = _BLOCK.match(block)
    if not m:
      raise MalformedReply(f"block {i + 1} starts with neither 'Question:' nor 'Answer:': {block[:60]!r}")
    label, text = m.group(1).lower(), m.group(2).strip()
    if not text:
      raise MalformedReply(f"block {i + 1} ({label}) is empty")
    if (label == "question") != (question is None):
      raise MalformedReply(f"block {i + 1}: expected {'an answer' if question else 'a question'}, got a {label}")
    if label == "question":
      question = text
    else:
      pairs.append((question, text))
      question = None
  if question is not None:
    raise MalformedReply("the last question has no answer")
  return pairs


def to_conversations(pairs: list[tuple[str, str]], rng: random.Random) -> list[dict[str, str]]:
  turns = []
  for i, (q, a) in enumerate(pairs):
    if i == 0:
      q = f"<image>\n{q}" if rng.random() < 0.5 else f"{q}\n<image>"
    turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
  return turns


def reply_to_record(reply: str, image: ImageContext, prompts: prompt_files.KindPrompts, record_id: str,
                    image_path: str, rng: random.Random, detail_requests: list[str]) -> dict[str, Any]:
  if prompts.reply_format == "description":
    if not reply.strip():
      raise MalformedReply("empty reply")
    pairs = [(detail_requests[rng.randrange(len(detail_requests))], reply.strip())]
  else:
    pairs = parse_qa(reply)
  return {"id": record_id, "image": image_path, "conversations": to_conversations(pairs, rng)}


def generate(client: llm_client.ChatClient, images: list[ImageContext], prompts: prompt_files.KindPrompts,
             output: str, *, seed: int = 0, image_prefix: str = "", detail_requests: list[str] | None = None,
             temperature: float | None = None, max_tokens: int | None = None) -> dict[str, int]:
  """Runs the requests not done yet, then writes `output` (all records in input order). Returns counts."""
  if prompts.reply_format == "description" and not detail_requests:
    raise ValueError("the description format needs detail_requests")
  counts = collections.Counter(images=len(images))
  record_id = lambda image: f"{image.image_id}-{prompts.kind}"
  with llm_client.ResumableJsonl(output + ".records.jsonl") as done, \
       llm_client.ResumableJsonl(output + ".malformed.jsonl") as malformed:
    todo = [im for im in images if record_id(im) not in done and record_id(im) not in malformed]
    counts["skipped_done"] = len(images) - len(todo)

    def request(image: ImageContext) -> str:
      messages = prompt_files.chat_messages(prompts, context_text(image, prompts.use_boxes))
      return client.chat(messages, temperature=temperature, max_tokens=max_tokens).content

    for image, reply, error in client.map_unordered(request, todo):
      rid = record_id(image)
      if error is not None:
        counts["request_failed"] += 1
        logging.error("image %r: request failed: %s", image.image_id, error)
        continue
      rng = random.Random(f"{seed}-{rid}")  # per image, so concurrency does not change the draws
      try:
        record = reply_to_record(reply, image, prompts, rid, image_prefix + image.file_name, rng,
                                 detail_requests or [])
      except MalformedReply as e:
        counts["malformed"] += 1
        logging.warning("image %r: malformed reply: %s", image.image_id, e)
        malformed.write({"id": rid, "image": image_prefix + image.file_name, "reason": str(e), "reply": reply})
        continue
      done.write(record)
      counts["written"] += 1
  by_id = {r["id"]: r for r in llm_client.read_jsonl(output + ".records.jsonl")}
  records = [by_id[record_id(im)] for im in images if record_id(im) in by_id]
  tmp = output + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(records, f, indent=1, ensure_ascii=False)
  os.replace(tmp, output)
  counts["total_records"] = len(records)
  counts["total_malformed"] = len(llm_client.read_jsonl(output + ".malformed.jsonl"))
  return dict(counts)


def add_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--captions", required=True, help="COCO captions annotation JSON")
  parser.add_argument("--instances", default=None, help="COCO instances annotation JSON (boxes)")
  parser.add_argument("--kind", required=True, choices=prompt_files.KINDS)
  parser.add_argument("--output", required=True, help="LLaVA JSON to write (progress files next to it)")
  parser.add_argument("--image-prefix", default="", help="prepended to every image path, e.g. coco/train2017/")
  parser.add_argument("--max-images", type=int, default=None, help="only the first N images")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--temperature", type=float, default=None, help="default: the endpoint's")
  parser.add_argument("--max-tokens", type=int, default=None, help="default: the endpoint's")
  parser.add_argument("--prompts-dir", default=None, help="a copy of llava_jax/datagen/prompts to use instead")
  llm_client.add_client_flags(parser)


def run(args: argparse.Namespace) -> int:
  prompts = prompt_files.load_kind(args.kind, args.prompts_dir)
  if prompts.use_boxes and not args.instances:
    raise ValueError(f"kind {args.kind!r} puts boxes in the context (kinds.json): give --instances")
  images, load_counts = load_coco(args.captions, args.instances if prompts.use_boxes else None)
  if args.max_images is not None:
    images = images[:args.max_images]
  detail = (prompt_files.instruction_list("detailed_description", args.prompts_dir)
            if prompts.reply_format == "description" else None)
  client = llm_client.client_from_flags(args)
  counts = generate(client, images, prompts, args.output, seed=args.seed, image_prefix=args.image_prefix,
                    detail_requests=detail, temperature=args.temperature, max_tokens=args.max_tokens)
  print(f"images {counts['images']} (skipped without caption {load_counts['skipped_no_caption']}), already done "
        f"{counts['skipped_done']}, written {counts.get('written', 0)}, malformed {counts.get('malformed', 0)}, "
        f"failed requests {counts.get('request_failed', 0)}; {args.output}: {counts['total_records']} records, "
        f"{counts['total_malformed']} set aside in {args.output}.malformed.jsonl")
  print(client.stats_line())
  if counts.get("request_failed"):
    print(f"{counts['request_failed']} images failed; run the same command again to retry them.", file=sys.stderr)
    return 1
  return 0
