"""POPE (object hallucination): yes/no extraction and accuracy, precision, recall, F1, yes-ratio.

    python -m llava_jax.eval.pope --annotation-dir POPE/coco --question-file llava_pope_test.jsonl \\
        --answers A.jsonl            # LLaVA's layout: coco_pope_<category>.json label files
    python -m llava_jax.eval.pope --labels LABELS.jsonl --answers A.jsonl   # {question_id, label} per line

Extraction as LLaVA's `eval_pope.py`: keep the text before the first '.', drop commas, split on single spaces;
if a word is exactly 'No', 'not' or 'no' the answer is no, else yes. "yes" is the positive class.

Matching: with `--labels`, answers and labels meet by question_id. In LLaVA's layout the label files number
their questions per category, so, as LLaVA does, a category's answers (the questions of that `category` in the
question file, in question-file order) are paired with its label file's lines in order; the counts must agree,
and where both sides carry `image` / `text` they are checked to agree (the question text starts with the label
file's text), so a misaligned pairing is an error instead of a wrong score.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

from llava_jax import llm_client

LABELS = ("yes", "no")


def extract_yes_no(text: str) -> str:
  """'yes' or 'no' from a free-form answer (LLaVA's rule, see the module docstring)."""
  if "." in text:
    text = text.split(".")[0]
  words = text.replace(",", "").split(" ")
  return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
  """Metrics of yes/no predictions against yes/no labels ('yes' positive). Undefined ratios (no positive
  prediction / label) are 0.0."""
  if len(predictions) != len(labels):
    raise ValueError(f"{len(predictions)} predictions vs {len(labels)} labels")
  if not labels:
    raise ValueError("no labels")
  for value in (*predictions, *labels):
    if value not in LABELS:
      raise ValueError(f"expected 'yes' or 'no', got {value!r}")
  tp = sum(p == "yes" and l == "yes" for p, l in zip(predictions, labels))
  fp = sum(p == "yes" and l == "no" for p, l in zip(predictions, labels))
  tn = sum(p == "no" and l == "no" for p, l in zip(predictions, labels))
  fn = sum(p == "no" and l == "yes" for p, l in zip(predictions, labels))
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"TP": tp, "FP": fp, "TN": tn, "FN": fn, "n": len(labels), "accuracy": (tp + tn) / len(labels),
          "precision": precision, "recall": recall, "f1": f1,
          "yes_ratio": sum(p == "yes" for p in predictions) / len(predictions)}


def _label(record: dict[str, Any], where: str) -> str:
  if record.get("label") not in LABELS:
    raise ValueError(f"{where}: label must be 'yes' or 'no', got {record.get('label')!r}")
  return record["label"]


def _answers_by_id(path: str) -> dict[Any, str]:
  answers = {}
  for line, r in llm_client.read_jsonl_lines(path):
    if "question_id" not in r or "text" not in r:
      raise KeyError(f"{path}:{line}: lacks 'question_id' or 'text'")
    answers[r["question_id"]] = r["text"]
  return answers


def score_by_id(labels_path: str, answers_path: str) -> dict[str, dict[str, float]]:
  answers = _answers_by_id(answers_path)
  predictions, labels = [], []
  for line, r in llm_client.read_jsonl_lines(labels_path):
    where = f"{labels_path}:{line}"
    if r.get("question_id") not in answers:
      raise KeyError(f"{where}: no answer for question_id {r.get('question_id')!r} in {answers_path}")
    labels.append(_label(r, where))
    predictions.append(extract_yes_no(answers[r["question_id"]]))
  return {"all": pope_metrics(predictions, labels)}


def score_llava_layout(annotation_dir: str, question_file: str, answers_path: str) -> dict[str, dict[str, float]]:
  questions = llm_client.read_jsonl(question_file)
  answers = _answers_by_id(answers_path)
  files = sorted(f for f in os.listdir(annotation_dir) if f.startswith("coco_pope_") and f.endswith(".json"))
  if not files:
    raise FileNotFoundError(f"{annotation_dir}: no coco_pope_<category>.json label files")
  results = {}
  for name in files:
    category = name[len("coco_pope_"):-len(".json")]
    label_path = os.path.join(annotation_dir, name)
    label_records = llm_client.read_jsonl(label_path)
    cat_questions = [q for q in questions if q.get("category") == category]
    if len(cat_questions) != len(label_records):
      raise ValueError(f"{label_path}: {len(label_records)} labels but {question_file} has "
                       f"{len(cat_questions)} questions of category {category!r}")
    predictions, labels = [], []
    for i, (q, lab) in enumerate(zip(cat_questions, label_records)):
      where = f"{label_path}:{i + 1}"
      if "image" in q and "image" in lab and q["image"] != lab["image"]:
        raise ValueError(f"{where}: image {lab['image']!r} but question {q['question_id']!r} shows {q['image']!r}")
      if "text" in q and "text" in lab and not q["text"].startswith(lab["text"]):
        raise ValueError(f"{where}: text {lab['text']!r} does not start question {q['question_id']!r}")
      if q["question_id"] not in answers:
        raise KeyError(f"{answers_path}: no answer for question_id {q['question_id']!r} ({category})")
      labels.append(_label(lab, where))
      predictions.append(extract_yes_no(answers[q["question_id"]]))
    results[category] = pope_metrics(predictions, labels)
  return results


def format_results(results: dict[str, dict[str, float]]) -> str:
  keys = ("f1", "accuracy", "precision", "recall", "yes_ratio")
  lines = [f"{'category':<14}{'n':>6}{'TP':>6}{'FP':>6}{'TN':>6}{'FN':>6}" + "".join(f"{k:>10}" for k in keys)]
  for category, m in results.items():
    lines.append(f"{category:<14}{m['n']:>6}{m['TP']:>6}{m['FP']:>6}{m['TN']:>6}{m['FN']:>6}"
                 + "".join(f"{100 * m[k]:>10.2f}" for k in keys))
  if len(results) > 1:
    lines.append(f"{'mean':<14}{'':>30}"
                 + "".join(f"{100 * sum(m[k] for m in results.values()) / len(results):>10.2f}" for k in keys))
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m llava_jax.eval.pope", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--answers", required=True, help="model_vqa answer JSONL")
  parser.add_argument("--labels", help="JSONL {question_id, label} matched to answers by question_id")
  parser.add_argument("--annotation-dir", help="folder of coco_pope_<category>.json label files (LLaVA layout)")
  parser.add_argument("--question-file", help="questions JSONL with 'category' (LLaVA layout)")
  args = parser.parse_args(argv)
  if args.labels:
    results = score_by_id(args.labels, args.answers)
  elif args.annotation_dir and args.question_file:
    results = score_llava_layout(args.annotation_dir, args.question_file, args.answers)
  else:
    parser.error("give --labels, or --annotation-dir with --question-file")
  print(format_results(results))
  return 0


if __name__ == "__main__":
  sys.exit(main())
