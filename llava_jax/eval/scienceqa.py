"""ScienceQA: problems.json + pid_splits.json -> LLaVA questions, and accuracy of a model's answer file.

    python -m llava_jax.eval.scienceqa convert --base-dir SQA/data/scienceqa --split test --output Q.jsonl \\
        [--llava-json TRAIN.json]
    python -m llava_jax.eval.scienceqa score --base-dir SQA/data/scienceqa --split test --answers A.jsonl \\
        [--output-result RESULT.json]

Questions follow LLaVA-1.5's `llava_test_CQM-A.json` as `model_vqa_science --single-pred-prompt` asks them:
"Context: <hint>\\n" (only when the hint is not empty), the question, then one "A. <choice>" line per choice, and
"Answer with the option's letter from the given choices directly." The image, when the problem has one, is
"<pid>/<image>" relative to the split's image folder (`images/<split>`); the answer CLI puts `<image>` first.

Answer extraction (LLaVA's `eval_science_qa.py`), on the answer text as written:
  1. the text is exactly one of the option letters A-E -> that letter;
  2. else it starts with "<letter A-E>. " -> that letter;
  3. else `re.findall(r'The answer is ([A-Z]).', text)` (the '.' is any character, as in LLaVA) has exactly one
     match -> that letter;
  4. else FAILED.
A letter beyond the problem's choices, FAILED, or a missing answer is wrong. Accuracy is over the whole split;
IMG accuracy over the problems with an image (LLaVA tests '<image>' in the answer's prompt, which is the same
set when every question has an answer; a missing answer counts as wrong here, and in its image group).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any, Sequence

from llava_jax import llm_client

OPTIONS = ("A", "B", "C", "D", "E")
SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."
FAILED = "FAILED"
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def load_split(base_dir: str, split: str) -> tuple[dict[str, dict[str, Any]], list[str]]:
  """(problems, pids of the split) from `problems.json` and `pid_splits.json` in `base_dir`."""
  with open(os.path.join(base_dir, "problems.json"), encoding="utf-8") as f:
    problems = json.load(f)
  splits_path = os.path.join(base_dir, "pid_splits.json")
  with open(splits_path, encoding="utf-8") as f:
    splits = json.load(f)
  if split not in splits:
    raise KeyError(f"{splits_path}: no split {split!r} (has {sorted(splits)})")
  missing = [pid for pid in splits[split] if pid not in problems]
  if missing:
    raise KeyError(f"{splits_path}: split {split!r} names {len(missing)} pids absent from problems.json, "
                   f"e.g. {missing[:3]}")
  return problems, list(splits[split])


def question_text(problem: dict[str, Any], *, single_pred_prompt: bool = True) -> str:
  """The CQM-A prompt of one problem (no `<image>` tag)."""
  choices = problem["choices"]
  if not 1 <= len(choices) <= len(OPTIONS):
    raise ValueError(f"problem has {len(choices)} choices; LLaVA's options are {OPTIONS}")
  hint = problem.get("hint") or ""
  text = (f"Context: {hint}\n" if hint else "") + problem["question"] + "\n"
  text += "\n".join(f"{letter}. {choice}" for letter, choice in zip(OPTIONS, choices))
  if single_pred_prompt:
    text += "\n" + SINGLE_PRED_PROMPT
  return text


def image_path(pid: str, problem: dict[str, Any]) -> str | None:
  return f"{pid}/{problem['image']}" if problem.get("image") else None


def to_questions(problems: dict[str, dict[str, Any]], pids: Sequence[str], *,
                 single_pred_prompt: bool = True) -> list[dict[str, Any]]:
  """`model_vqa` question records: {question_id: pid, image?, text, category: 'image' | 'no_image'}."""
  out = []
  for pid in pids:
    p = problems[pid]
    record = {"question_id": pid, "text": question_text(p, single_pred_prompt=single_pred_prompt)}
    if image_path(pid, p):
      record["image"] = image_path(pid, p)
    record["category"] = "image" if "image" in record else "no_image"
    out.append(record)
  return out


def to_llava_json(problems: dict[str, dict[str, Any]], pids: Sequence[str]) -> list[dict[str, Any]]:
  """Training records (LLaVA JSON): the CQM-A question (`<image>` first when there is one) -> the letter."""
  out = []
  for pid in pids:
    p = problems[pid]
    text = question_text(p, single_pred_prompt=True)
    record: dict[str, Any] = {"id": pid}
    if image_path(pid, p):
      record["image"] = image_path(pid, p)
      text = "<image>\n" + text
    record["conversations"] = [{"from": "human", "value": text},
                               {"from": "gpt", "value": OPTIONS[p["answer"]]}]
    out.append(record)
  return out


def extract_answer(text: str) -> str:
  """The option letter of an answer text, or FAILED (rules in the module docstring)."""
  if text in OPTIONS:
    return text
  if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
    return text[0]
  matches = _ANSWER_IS.findall(text)
  return matches[0] if len(matches) == 1 else FAILED


def score(problems: dict[str, dict[str, Any]], pids: Sequence[str], answers: dict[str, str]) -> dict[str, Any]:
  """Accuracy (%) over `pids` and over those with an image. `answers`: pid -> answer text."""
  correct = img_total = img_correct = failed = missing = 0
  results, parsed = {}, {}
  for pid in pids:
    p = problems[pid]
    if pid in answers:
      letter = extract_answer(answers[pid])
    else:
      letter, missing = FAILED, missing + 1
    failed += letter == FAILED
    pred_idx = OPTIONS.index(letter) if letter in OPTIONS[:len(p["choices"])] else -1
    results[pid], parsed[pid] = pred_idx, letter
    is_correct = pred_idx == p["answer"]
    correct += is_correct
    if p.get("image"):
      img_total += 1
      img_correct += is_correct
  total = len(pids)
  return {"acc": 100.0 * correct / total if total else float("nan"), "correct": correct, "count": total,
          "img_acc": 100.0 * img_correct / img_total if img_total else float("nan"), "img_correct": img_correct,
          "img_count": img_total, "failed_extraction": failed, "missing": missing, "results": results,
          "parsed": parsed}


def load_answers(path: str) -> dict[str, str]:
  """question_id (as a string, like ScienceQA pids) -> text, from a `model_vqa` answer file."""
  answers = {}
  for line, r in llm_client.read_jsonl_lines(path):
    if "question_id" not in r or "text" not in r:
      raise KeyError(f"{path}:{line}: lacks 'question_id' or 'text'")
    answers[str(r["question_id"])] = r["text"]
  return answers


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m llava_jax.eval.scienceqa", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  conv = sub.add_parser("convert", help="problems.json + split -> questions JSONL (and LLaVA training JSON)")
  conv.add_argument("--base-dir", required=True, help="folder with problems.json and pid_splits.json")
  conv.add_argument("--split", default="test")
  conv.add_argument("--output", required=True, help="questions JSONL for the answer CLI")
  conv.add_argument("--llava-json", default=None, help="also write LLaVA training JSON (question -> letter)")
  conv.add_argument("--no-single-pred-prompt", action="store_true",
                    help="leave out \"Answer with the option's letter from the given choices directly.\"")
  sc = sub.add_parser("score", help="accuracy of an answer file")
  sc.add_argument("--base-dir", required=True)
  sc.add_argument("--split", default="test")
  sc.add_argument("--answers", required=True, help="model_vqa answer JSONL (question_id = pid, text)")
  sc.add_argument("--output-result", default=None, help="write the scores and per-problem results as JSON")
  args = parser.parse_args(argv)

  problems, pids = load_split(args.base_dir, args.split)
  if args.command == "convert":
    questions = to_questions(problems, pids, single_pred_prompt=not args.no_single_pred_prompt)
    with open(args.output, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(q, ensure_ascii=False) + "\n" for q in questions)
    if args.llava_json:
      with open(args.llava_json, "w", encoding="utf-8") as f:
        json.dump(to_llava_json(problems, pids), f, indent=2, ensure_ascii=False)
    n_img = sum("image" in q for q in questions)
    print(f"{len(questions)} questions ({n_img} with an image) -> {args.output}")
    return 0
  result = score(problems, pids, load_answers(args.answers))
  print(f"Total: {result['count']}, Correct: {result['correct']}, Accuracy: {result['acc']:.2f}%, "
        f"IMG-Accuracy: {result['img_acc']:.2f}% ({result['img_correct']}/{result['img_count']}), "
        f"extraction FAILED: {result['failed_extraction']} (missing answers: {result['missing']})")
  if args.output_result:
    with open(args.output_result, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
