r"""Answer files in LLaVA's `model_vqa` format: batched generation over a question file, resumable.

  python -m llava_jax.eval.answer --model DIR --questions Q.jsonl --image-folder F --answers A.jsonl \
      [--batch-size 8] [--temperature 0] [--top-p 1] [--max-new-tokens 1024] [--model-id NAME]

--max-new-tokens defaults to 1024, as LLaVA's `model_vqa.py` and `model_vqa_science.py` (LLaVA-Bench, MM-Vet,
ScienceQA); its `model_vqa_loader.py` (VQAv2, GQA, TextVQA, POPE, MME, ...) uses 128: pass `--max-new-tokens 128`
there. Rows end at EOS either way; the limit sets the KV cache length.

Questions: one JSON object a line, {question_id, text, image?, category?}; `image` is a path relative to
--image-folder; a question without one is asked text-only. The prompt is the model folder's template around
'<image>\n' + text (text alone without an image), as LLaVA's `model_vqa.py` builds it.

Answers: one line per question, {question_id, prompt (the question text), text (the answer, stripped),
answer_id (a fresh uuid), model_id, metadata: {}}, appended and flushed one at a time in question order.
Questions whose question_id is already in A.jsonl are skipped, so an interrupted run is resumed by running the
same command again (a last line cut off mid-write is dropped). A progress bar goes to stderr.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import uuid
from typing import Any, Sequence

from absl import logging
import tqdm

from llava_jax import generate
from llava_jax import llm_client


def read_questions(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The question records; errors name the file and line (missing or ill-typed keys, repeated question_id)."""
  questions, seen = [], {}
  for line, record in llm_client.read_jsonl_lines(path):
    where = f"{path}:{line}"
    if not isinstance(record, dict):
      raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("question_id", "text"):
      if key not in record:
        raise ValueError(f"{where}: missing key {key!r}")
    if not isinstance(record["text"], str):
      raise ValueError(f"{where}: 'text' must be a string, got {type(record['text']).__name__}")
    image = record.get("image")
    if image is not None and (not isinstance(image, str) or not image):
      raise ValueError(f"{where}: 'image' must be a non-empty string (a path under --image-folder), got {image!r}")
    qid = record["question_id"]
    if not isinstance(qid, (str, int)) or isinstance(qid, bool):
      raise ValueError(f"{where}: question_id must be a string or an integer, got {qid!r}")
    if qid in seen:
      raise ValueError(f"{where}: question_id {qid!r} already used on line {seen[qid]}")
    seen[qid] = line
    questions.append(record)
  return questions


def model_name(path: str | os.PathLike) -> str:
  """LLaVA's `get_model_name_from_path`: the folder name, with its parent for a 'checkpoint-*' folder."""
  parts = pathlib.Path(os.path.abspath(path)).parts
  if parts[-1].startswith("checkpoint-") and len(parts) > 1:
    return f"{parts[-2]}_{parts[-1]}"
  return parts[-1]


def answer_questions(generator: generate.Generator, questions: Sequence[dict[str, Any]], image_folder: str | None,
                     answers_path: str | os.PathLike, params: generate.SamplingParams, *, batch_size: int = 8,
                     model_id: str = "llava_jax", progress: bool = True) -> int:
  """Appends an answer record for every question not yet in `answers_path`; returns how many were written."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  with llm_client.ResumableJsonl(answers_path, key="question_id") as writer:
    todo = [q for q in questions if q["question_id"] not in writer]
    skipped = len(questions) - len(todo)
    if skipped:
      logging.info("%s: %d of %d questions already answered; %d to go", answers_path, skipped, len(questions),
                   len(todo))
    bar = tqdm.tqdm(total=len(todo), file=sys.stderr, disable=not progress, unit="q")
    for start in range(0, len(todo), batch_size):
      batch = todo[start:start + batch_size]
      requests = [_request(generator, q, image_folder) for q in batch]
      outputs = generator.generate(requests, params, min_rows=batch_size)
      for q, out in zip(batch, outputs):
        writer.write({"question_id": q["question_id"], "prompt": q["text"], "text": out.text.strip(),
                      "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": {}})
      bar.update(len(batch))
    bar.close()
  return len(todo)


def _request(generator: generate.Generator, question: dict[str, Any], image_folder: str | None
             ) -> generate.Request:
  images = []
  if question.get("image"):
    if image_folder is None:
      raise ValueError(f"question_id {question['question_id']!r} has an image but no --image-folder was given")
    images = [os.path.join(image_folder, question["image"])]
  try:
    return generator.question(question["text"], images)
  except ValueError as e:
    raise ValueError(f"question_id {question['question_id']!r}: {e}") from e


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m llava_jax.eval.answer", description=__doc__.split("\n")[0])
  generate.add_model_flags(parser)
  parser.add_argument("--questions", required=True, help="question JSONL")
  parser.add_argument("--image-folder", default=None, help="folder the questions' image paths are relative to")
  parser.add_argument("--answers", required=True, help="answer JSONL (appended to; existing answers are kept)")
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--model-id", default=None, help="model_id written (default: the model folder's name)")
  generate.add_sampling_flags(parser, max_new_tokens=1024)  # LLaVA's model_vqa.py
  args = parser.parse_args(argv)
  logging.use_absl_handler()
  questions = read_questions(args.questions)
  generator = generate.Generator.from_folder(args.model, generate.runtime_from_flag(args.dtype),
                                             template=args.template, decode_attention=args.decode_attention)
  params = generator.params(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
  written = answer_questions(generator, questions, args.image_folder, args.answers, params,
                             batch_size=args.batch_size, model_id=args.model_id or model_name(args.model))
  logging.info("%s: wrote %d answers", args.answers, written)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
