"""LLaVA-Bench review: an LLM judge compares a model's answers with reference answers, per question category.

    python -m llava_jax.eval.judge --questions Q.jsonl --context CONTEXT.jsonl --answers-ref REF.jsonl \\
        --answers MODEL.jsonl --output REVIEW.jsonl --base-url URL --model gpt-4-0314 [--rules RULES.json]
    python -m llava_jax.eval.judge summarize REVIEW.jsonl [...]

As LLaVA's `eval_gpt_review_visual.py` (LLaVA-Bench COCO) and `eval_gpt_review_bench.py` (in-the-wild):
- questions: {question_id, image, text, category in conv|detail|complex}; answers (reference = Assistant 1,
  model = Assistant 2): {question_id, text, answer_id?}, matched to the questions by question_id.
- context per image: {image, captions: [...], instances: [{category, bbox}]} (COCO: the captions, a blank line,
  then "category: [x1, y1, x2, y2]" lines) or {image, caption} (in-the-wild: the caption sentences).
- rule: the category's entry of the rules file ({key: {role, prompt}}, LLaVA's rule.json format); the key is
  `llava_bench_<category>` for contexts without boxes when the rules have it, else `<category>`.
- request: system "You are a helpful and precise assistant for checking the quality of the answer.", the user
  content [Context] / [Question] / [Assistant 1] ... [End of Assistant 1] / [Assistant 2] ... / [System] rule,
  temperature 0.2, max_tokens 1024.
- score: `parse_score` of the reply (see there); review line {id, question_id, answer1_id, answer2_id, category,
  content, tuple}. Resumable: questions already in the output are skipped; requests that fail for good are
  counted, not written, and retried by the next run (exit status 1).
- summary: relative score = mean(Assistant 2) / mean(Assistant 1) * 100 per category and over all reviews.
  Unparseable reviews ([-1, -1]) stay in the means as in LLaVA's `summarize_gpt_review.py`; their count is
  printed, and `--exclude-failed` leaves them out.
"""
from __future__ import annotations

import argparse
import collections
import importlib.resources
import json
import math
import sys
from typing import Any, Sequence

from absl import logging

from llava_jax import llm_client

SYSTEM_MESSAGE = "You are a helpful and precise assistant for checking the quality of the answer."
CATEGORIES = ("conv", "detail", "complex")
FAILED_SCORE = [-1, -1]


def default_rules() -> dict[str, dict[str, str]]:
  """The package's rule prompts (`llava_jax/eval/prompts/llava_bench_rules.json`), same meaning as LLaVA's."""
  path = importlib.resources.files("llava_jax.eval") / "prompts" / "llava_bench_rules.json"
  return json.loads(path.read_text(encoding="utf-8"))


def parse_score(review: str) -> list[float]:
  """LLaVA's score parsing: the first line, commas turned into spaces, split on single spaces; exactly two
  fields that are floats -> [score 1, score 2], anything else -> [-1, -1].

  As in LLaVA, "8 9", "8,9" and "8.5 7" parse, while "8, 9" (comma + space leaves an empty field), "8  9",
  a trailing space, or "Assistant 1: 8" do not.
  """
  first_line = review.split("\n")[0].replace(",", " ")
  fields = first_line.split(" ")
  if len(fields) != 2:
    return list(FAILED_SCORE)
  try:
    return [float(fields[0]), float(fields[1])]
  except ValueError:
    return list(FAILED_SCORE)


def context_text(context: dict[str, Any]) -> str:
  """The [Context] block: caption lines, then (COCO) a blank line and one "category: bbox" line per instance."""
  captions = context.get("captions", context.get("caption"))
  if captions is None:
    raise KeyError(f"context for image {context.get('image')!r} has neither 'captions' nor 'caption'")
  text = captions if isinstance(captions, str) else "\n".join(captions)
  if "instances" in context:
    boxes = "\n".join(f"{inst['category']}: {json.dumps(inst['bbox'])}" for inst in context["instances"])
    text = f"{text}\n\n{boxes}"
  return text


def review_content(context: str, question: str, answer1: str, answer2: str, rule: dict[str, str]) -> str:
  role, prompt = rule["role"], rule["prompt"]
  return (f"[Context]\n{context}\n\n"
          f"[Question]\n{question}\n\n"
          f"[{role} 1]\n{answer1}\n\n[End of {role} 1]\n\n"
          f"[{role} 2]\n{answer2}\n\n[End of {role} 2]\n\n"
          f"[System]\n{prompt}\n\n")


def rule_key(category: str, context: dict[str, Any], rules: dict[str, Any]) -> str:
  prefixed = "llava_bench_" + category
  key = prefixed if "instances" not in context and prefixed in rules else category
  if key not in rules:
    raise KeyError(f"category {category!r}: no rule {key!r} in the rules file (keys: {sorted(rules)})")
  return key


def _by_question_id(records: list[dict[str, Any]], path: str) -> dict[Any, dict[str, Any]]:
  out = {}
  for i, r in enumerate(records):
    if "question_id" not in r:
      raise KeyError(f"{path}: record {i + 1} has no 'question_id'")
    if r["question_id"] in out:
      raise ValueError(f"{path}: question_id {r['question_id']!r} appears twice")
    out[r["question_id"]] = r
  return out


def build_requests(questions: list[dict[str, Any]], contexts: list[dict[str, Any]],
                   ref_answers: dict[Any, dict[str, Any]], model_answers: dict[Any, dict[str, Any]],
                   rules: dict[str, Any], *, paths: Sequence[str] = ("questions", "context", "ref", "answers")
                   ) -> list[tuple[dict[str, Any], str]]:
  """(review record without content/tuple, user content) per question, in question order."""
  q_path, c_path, r_path, a_path = paths
  image_to_context = {c["image"]: c for c in contexts}
  out = []
  for idx, q in enumerate(questions):
    qid = q["question_id"]
    for answers, path in ((ref_answers, r_path), (model_answers, a_path)):
      if qid not in answers:
        raise KeyError(f"{path}: no answer for question_id {qid!r} (from {q_path})")
    if q["image"] not in image_to_context:
      raise KeyError(f"{c_path}: no context for image {q['image']!r} (question_id {qid!r})")
    context = image_to_context[q["image"]]
    key = rule_key(q["category"], context, rules)
    ans1, ans2 = ref_answers[qid], model_answers[qid]
    record = {"id": idx + 1, "question_id": qid, "answer1_id": ans1.get("answer_id", ans1["question_id"]),
              "answer2_id": ans2.get("answer_id", ans2["question_id"]), "category": key}
    out.append((record, review_content(context_text(context), q["text"], ans1["text"], ans2["text"], rules[key])))
  return out


def run_reviews(client: llm_client.ChatClient, requests: list[tuple[dict[str, Any], str]], output: str, *,
                temperature: float = 0.2, max_tokens: int = 1024) -> dict[str, int]:
  """Sends the reviews not yet in `output`, appending each as it arrives. Returns counts for this run."""
  counts = collections.Counter()
  with llm_client.ResumableJsonl(output, key="question_id") as writer:
    todo = [r for r in requests if r[0]["question_id"] not in writer]
    counts["skipped_done"] = len(requests) - len(todo)

    def review(request):
      record, content = request
      reply = client.chat([{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": content}],
                          temperature=temperature, max_tokens=max_tokens)
      return reply.content

    for (record, _), reply, error in client.map_unordered(review, todo):
      if error is not None:
        counts["request_failed"] += 1
        logging.error("question_id %r: judge request failed: %s", record["question_id"], error)
        continue
      scores = parse_score(reply)
      if scores == FAILED_SCORE:
        counts["parse_failed"] += 1
        logging.warning("question_id %r: cannot parse scores from the review's first line: %r",
                        record["question_id"], reply.split("\n")[0][:200])
      writer.write({**record, "content": reply, "tuple": scores})
      counts["reviewed"] += 1
  return dict(counts)


def summarize(reviews: list[dict[str, Any]], *, exclude_failed: bool = False) -> dict[str, dict[str, float]]:
  """Per category and 'all': ref_mean, model_mean, relative (= model_mean / ref_mean * 100), n, parse_failed."""
  groups = collections.defaultdict(list)
  for r in reviews:
    groups[r["category"]].append(r["tuple"])
    groups["all"].append(r["tuple"])
  summary = {}
  for category in sorted(groups, key=lambda c: (c == "all", c)):
    tuples = groups[category]
    failed = sum(list(t) == FAILED_SCORE for t in tuples)
    used = [t for t in tuples if not (exclude_failed and list(t) == FAILED_SCORE)]
    ref = sum(t[0] for t in used) / len(used) if used else math.nan
    model = sum(t[1] for t in used) / len(used) if used else math.nan
    relative = model / ref * 100 if used and ref else math.nan
    summary[category] = {"relative": relative, "model_mean": model, "ref_mean": ref, "n": len(used),
                         "parse_failed": failed}
  return summary


def format_summary(summary: dict[str, dict[str, float]]) -> str:
  lines = [f"{'category':<22}{'relative':>9}{'model':>8}{'ref':>8}{'n':>6}{'unparsed':>10}"]
  for category, s in summary.items():
    lines.append(f"{category:<22}{s['relative']:>9.1f}{s['model_mean']:>8.3f}{s['ref_mean']:>8.3f}"
                 f"{s['n']:>6d}{s['parse_failed']:>10d}")
  return "\n".join(lines)


def _review_main(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m llava_jax.eval.judge", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--questions", required=True, help="questions JSONL (question_id, image, text, category)")
  parser.add_argument("--context", required=True, help="context JSONL (image, captions/caption, instances?)")
  parser.add_argument("--answers-ref", required=True, help="reference answers JSONL (Assistant 1)")
  parser.add_argument("--answers", required=True, help="model answers JSONL (Assistant 2)")
  parser.add_argument("--rules", default=None, help="rules JSON {key: {role, prompt}} (default: the package's)")
  parser.add_argument("--output", required=True, help="review JSONL (appended to; resumable)")
  parser.add_argument("--temperature", type=float, default=0.2)
  parser.add_argument("--max-tokens", type=int, default=1024)
  parser.add_argument("--exclude-failed", action="store_true", help="leave [-1, -1] reviews out of the summary")
  llm_client.add_client_flags(parser)
  args = parser.parse_args(argv)

  if args.rules:
    with open(args.rules, encoding="utf-8") as f:
      rules = json.load(f)
  else:
    rules = default_rules()
  questions = llm_client.read_jsonl(args.questions)
  _by_question_id(questions, args.questions)  # checks ids are present and unique
  requests = build_requests(
      questions, llm_client.read_jsonl(args.context),
      _by_question_id(llm_client.read_jsonl(args.answers_ref), args.answers_ref),
      _by_question_id(llm_client.read_jsonl(args.answers), args.answers), rules,
      paths=(args.questions, args.context, args.answers_ref, args.answers))
  client = llm_client.client_from_flags(args)
  counts = run_reviews(client, requests, args.output, temperature=args.temperature, max_tokens=args.max_tokens)
  print(f"reviews written {counts.get('reviewed', 0)}, already done {counts.get('skipped_done', 0)}, "
        f"unparseable scores {counts.get('parse_failed', 0)}, failed requests {counts.get('request_failed', 0)}")
  print(client.stats_line())
  print(format_summary(summarize(llm_client.read_jsonl(args.output), exclude_failed=args.exclude_failed)))
  if counts.get("request_failed"):
    print(f"{counts['request_failed']} reviews failed; run the same command again to retry them.", file=sys.stderr)
    return 1
  return 0


def _summarize_main(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m llava_jax.eval.judge summarize",
                                   description="Relative scores of LLaVA-Bench review files.")
  parser.add_argument("reviews", nargs="+", help="review JSONL files")
  parser.add_argument("--exclude-failed", action="store_true", help="leave [-1, -1] reviews out of the means")
  args = parser.parse_args(argv)
  for path in args.reviews:
    print(path)
    print(format_summary(summarize(llm_client.read_jsonl(path), exclude_failed=args.exclude_failed)))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] == "summarize":
    return _summarize_main(argv[1:])
  return _review_main(argv)


if __name__ == "__main__":
  sys.exit(main())
