"""LLaVA-Bench judge against a local HTTP server: request content, canned scores -> relative scores computed by
hand, malformed replies, 429 / 500 retries, resumability, and the CLI."""
import json
import re

import pytest

from llava_jax import llm_client
from llava_jax.eval import judge
from llava_jax.llm_client_testing import FakeChatServer, FakeResponse

SECRET = "sk-judge-SECRET-987"


@pytest.mark.parametrize("review, expected", [
    ("8 9\nAssistant 1 was better.", [8.0, 9.0]),
    ("8,9", [8.0, 9.0]),
    ("7.5 10", [7.5, 10.0]),
    ("8, 9\nexplanation", [-1, -1]),  # LLaVA splits on single spaces: '8' '' '9' -> 3 fields
    ("8  9", [-1, -1]),
    ("8 9 ", [-1, -1]),
    ("Assistant 1: 8\nAssistant 2: 6", [-1, -1]),
    ("8\n9", [-1, -1]),  # only the first line counts
    ("eight nine", [-1, -1]),
    ("", [-1, -1]),
    ("8 9 10", [-1, -1]),
])
def test_parse_score_follows_llava(review, expected):
  assert judge.parse_score(review) == expected


def test_context_and_rule_selection():
  coco = {"image": "a.jpg", "captions": ["A dog.", "A brown dog."],
          "instances": [{"category": "dog", "bbox": [0.1, 0.25, 0.5, 0.875]}]}
  wild = {"image": "b.jpg", "caption": "A street at night."}
  assert judge.context_text(coco) == "A dog.\nA brown dog.\n\ndog: [0.1, 0.25, 0.5, 0.875]"
  assert judge.context_text(wild) == "A street at night."
  rules = judge.default_rules()
  assert judge.rule_key("conv", coco, rules) == "conv"
  assert judge.rule_key("detail", wild, rules) == "llava_bench_detail"
  assert judge.rule_key("complex", wild, {"complex": {}}) == "complex"
  with pytest.raises(KeyError, match="no rule 'other'"):
    judge.rule_key("other", coco, rules)
  with pytest.raises(KeyError, match="neither 'captions' nor 'caption'"):
    judge.context_text({"image": "c.jpg"})
  # The package rules keep LLaVA's meaning: the box convention for COCO, and the two-scores-first-line format.
  for key in ("conv", "detail", "complex", "llava_bench_conv", "llava_bench_detail", "llava_bench_complex"):
    prompt = rules[key]["prompt"]
    assert rules[key]["role"] == "Assistant"
    assert "single line" in prompt and "two scores" in prompt and "1 to 10" in prompt
    assert ("(x1, y1, x2, y2)" in prompt) == (not key.startswith("llava_bench_"))


# question_id -> (category, image, canned first line of the review). Scores: (Assistant 1 = ref, 2 = model).
CANNED = {
    0: ("conv", "a.jpg", "8 6"),
    1: ("detail", "a.jpg", "7 7"),
    2: ("complex", "a.jpg", "6 9"),
    3: ("conv", "b.jpg", "9,3"),
    4: ("detail", "b.jpg", "10 5"),
    5: ("complex", "b.jpg", "8.5 4.25"),
    6: ("conv", "b.jpg", "Assistant 1: 9/10, Assistant 2: 2/10"),  # malformed -> [-1, -1]
}


def _write_inputs(tmp_path):
  questions = [{"question_id": q, "image": img, "text": f"Question number {q}?", "category": cat}
               for q, (cat, img, _) in CANNED.items()]
  contexts = [
      {"id": "a", "image": "a.jpg", "captions": ["Two dogs on grass.", "Dogs playing."],
       "instances": [{"category": "dog", "bbox": [0.1, 0.2, 0.4, 0.9]}, {"category": "dog",
                                                                          "bbox": [0.5, 0.3, 0.9, 0.8]}]},
      {"id": "b", "image": "b.jpg", "captions": ["A kitchen."], "instances": []},
  ]
  ref = [{"question_id": q, "text": f"Reference answer {q}.", "category": c} for q, (c, _, _) in CANNED.items()]
  model = [{"question_id": q, "prompt": f"Question number {q}?", "text": f"Model answer {q}.",
            "answer_id": f"ans{q}", "model_id": "tiny", "metadata": {}} for q in reversed(list(CANNED))]
  paths = {}
  for name, records in (("questions", questions), ("context", contexts), ("ref", ref), ("model", model)):
    paths[name] = tmp_path / f"{name}.jsonl"
    paths[name].write_text("".join(json.dumps(r) + "\n" for r in records))
  return paths


def _responder(fail_first=None, always_fail=()):
  """Replies with the canned scores of the question in the request; `fail_first` {qid: status} fails the first
  request for that question with that status; questions in `always_fail` get HTTP 400."""
  seen = set()

  def respond(body, index):
    del index
    content = body["messages"][1]["content"]
    qid = int(re.search(r"\[Question\]\nQuestion number (\d+)\?", content).group(1))
    if qid in always_fail:
      return FakeResponse(status=400)
    if fail_first and qid in fail_first and qid not in seen:
      seen.add(qid)
      return FakeResponse(status=fail_first[qid], headers={"Retry-After": "0"})
    return FakeResponse(content=CANNED[qid][2] + "\nBoth answers are fine; explanation here.")

  return respond


def _argv(paths, server, output, *extra):
  return ["--questions", str(paths["questions"]), "--context", str(paths["context"]),
          "--answers-ref", str(paths["ref"]), "--answers", str(paths["model"]), "--output", str(output),
          "--base-url", server.base_url, "--model", "gpt-judge", "--api-key-env", "JUDGE_KEY",
          "--max-workers", "3", "--backoff-initial", "0.001", "--backoff-max", "0.01", *extra]


def test_judge_cli_scores_retries_and_summary(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("JUDGE_KEY", SECRET)
  paths = _write_inputs(tmp_path)
  out = tmp_path / "review.jsonl"
  with FakeChatServer(_responder(fail_first={3: 429, 4: 500})) as server:
    assert judge.main(_argv(paths, server, out)) == 0
    assert server.request_count() == len(CANNED) + 2  # one 429 and one 500 retried
    printed = capsys.readouterr().out
    # A second run finds everything done and sends nothing.
    assert judge.main(_argv(paths, server, out)) == 0
    assert server.request_count() == len(CANNED) + 2
  assert "429 x1" in printed and "5xx x1" in printed and "unparseable scores 1" in printed
  assert SECRET not in printed + capsys.readouterr().out

  # The request for question 0, checked against the LLaVA format written out by hand.
  body = next(r.body for r in server.requests if "Question number 0?" in r.body["messages"][1]["content"])
  assert body["model"] == "gpt-judge" and body["temperature"] == 0.2 and body["max_tokens"] == 1024
  assert body["messages"][0] == {"role": "system", "content": "You are a helpful and precise assistant for "
                                                              "checking the quality of the answer."}
  rule = judge.default_rules()["conv"]["prompt"]
  assert body["messages"][1]["content"] == (
      "[Context]\nTwo dogs on grass.\nDogs playing.\n\ndog: [0.1, 0.2, 0.4, 0.9]\ndog: [0.5, 0.3, 0.9, 0.8]\n\n"
      "[Question]\nQuestion number 0?\n\n"
      "[Assistant 1]\nReference answer 0.\n\n[End of Assistant 1]\n\n"
      "[Assistant 2]\nModel answer 0.\n\n[End of Assistant 2]\n\n"
      f"[System]\n{rule}\n\n")
  assert all(r.headers.get("Authorization") == "Bearer " + SECRET for r in server.requests)

  reviews = {r["question_id"]: r for r in llm_client.read_jsonl(out)}
  assert sorted(reviews) == list(CANNED)
  assert reviews[6]["tuple"] == [-1, -1] and reviews[5]["tuple"] == [8.5, 4.25]
  assert reviews[0]["answer1_id"] == 0 and reviews[0]["answer2_id"] == "ans0" and reviews[2]["id"] == 3
  assert reviews[2]["category"] == "complex" and reviews[0]["content"].startswith("8 6\n")

  # Hand computation. conv: refs 8, 9, -1; model 6, 3, -1 (LLaVA keeps the failed review in the means).
  summary = judge.summarize(list(reviews.values()))
  assert summary["conv"]["relative"] == pytest.approx(100 * (8 / 3) / (16 / 3))  # 50.0
  assert summary["conv"]["parse_failed"] == 1 and summary["conv"]["n"] == 3
  assert summary["detail"]["relative"] == pytest.approx(100 * 6 / 8.5)
  assert summary["complex"]["relative"] == pytest.approx(100 * (13.25 / 2) / (14.5 / 2))
  assert summary["all"]["relative"] == pytest.approx(100 * 33.25 / 47.5)  # 70.0
  assert summary["all"]["model_mean"] == pytest.approx(33.25 / 7)
  assert summary["all"]["ref_mean"] == pytest.approx(47.5 / 7)
  excluded = judge.summarize(list(reviews.values()), exclude_failed=True)
  assert excluded["conv"]["relative"] == pytest.approx(100 * 4.5 / 8.5) and excluded["conv"]["n"] == 2
  assert excluded["all"]["relative"] == pytest.approx(100 * 34.25 / 48.5)

  assert judge.main(["summarize", str(out)]) == 0
  table = capsys.readouterr().out
  rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[2:]}
  assert rows["conv"][0] == "50.0" and rows["all"][0] == "70.0" and rows["conv"][4] == "1"
  assert list(rows) == ["complex", "conv", "detail", "all"]


def test_failed_requests_are_retried_by_the_next_run(tmp_path, capsys):
  paths = _write_inputs(tmp_path)
  out = tmp_path / "review.jsonl"
  with FakeChatServer(_responder(always_fail={2, 5})) as server:
    assert judge.main(_argv(paths, server, out)) == 1
  assert "2 reviews failed" in capsys.readouterr().err
  assert sorted(r["question_id"] for r in llm_client.read_jsonl(out)) == [0, 1, 3, 4, 6]
  with FakeChatServer(_responder()) as server:
    assert judge.main(_argv(paths, server, out)) == 0
    assert server.request_count() == 2  # only the two missing reviews
  assert sorted(r["question_id"] for r in llm_client.read_jsonl(out)) == list(CANNED)


def test_missing_answer_is_an_error_naming_the_file(tmp_path):
  paths = _write_inputs(tmp_path)
  lines = paths["model"].read_text().splitlines()
  paths["model"].write_text("\n".join(lines[1:]) + "\n")  # drops question 6's answer
  with FakeChatServer(_responder()) as server:
    with pytest.raises(KeyError, match=r"model.jsonl: no answer for question_id 6"):
      judge.main(_argv(paths, server, tmp_path / "r.jsonl"))
    assert server.request_count() == 0
