"""POPE yes/no extraction (LLaVA's eval_pope rules) and metrics on hand-made cases."""
import json

import pytest

from llava_jax.eval import pope


@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"),
    ("No", "no"),
    ("No.", "no"),
    ("no, there is none", "no"),  # comma removed -> the word 'no'
    ("There is no dog in the image.", "no"),
    ("I do not see a dog", "no"),
    ("Yes, there is a dog. No other animals.", "yes"),  # only the first sentence counts
    ("Yes. There is no cat", "yes"),
    ("NO", "yes"),  # case-sensitive word match, as in LLaVA
    ("Not really", "yes"),  # 'Not' is not in the list
    ("Nope", "yes"),
    ("It cannot be seen", "yes"),  # 'not' must be a whole word
    ("No\nthere is none", "yes"),  # split on spaces only: 'No\nthere' is one word
    ("", "yes"),
])
def test_extract_yes_no(text, expected):
  assert pope.extract_yes_no(text) == expected


def test_metrics_by_hand():
  preds = ["yes", "yes", "yes", "no", "no", "yes", "no", "no", "yes", "yes"]
  labels = ["yes", "yes", "no", "no", "yes", "yes", "no", "no", "no", "yes"]
  m = pope.pope_metrics(preds, labels)
  # TP: items 0, 1, 5, 9 = 4; FP: 2, 8 = 2; TN: 3, 6, 7 = 3; FN: 4 = 1.
  assert (m["TP"], m["FP"], m["TN"], m["FN"]) == (4, 2, 3, 1)
  assert m["accuracy"] == pytest.approx(0.7)
  assert m["precision"] == pytest.approx(4 / 6) and m["recall"] == pytest.approx(4 / 5)
  assert m["f1"] == pytest.approx(2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5))
  assert m["yes_ratio"] == pytest.approx(0.6)
  none_yes = pope.pope_metrics(["no", "no"], ["yes", "no"])
  assert none_yes["precision"] == 0.0 and none_yes["f1"] == 0.0 and none_yes["accuracy"] == 0.5
  with pytest.raises(ValueError, match="'Yes'"):
    pope.pope_metrics(["yes"], ["Yes"])
  with pytest.raises(ValueError, match="2 predictions vs 1 labels"):
    pope.pope_metrics(["yes", "no"], ["yes"])


def _jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def test_cli_llava_layout_and_by_id(tmp_path, capsys):
  # Two categories; label files number their questions 1..n each, the question file has global ids.
  ann = tmp_path / "coco"
  ann.mkdir()
  _jsonl(ann / "coco_pope_random.json", [
      {"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"},
      {"question_id": 2, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "no"}])
  _jsonl(ann / "coco_pope_popular.json", [
      {"question_id": 1, "image": "b.jpg", "text": "Is there a car in the image?", "label": "yes"},
      {"question_id": 2, "image": "b.jpg", "text": "Is there a bus in the image?", "label": "no"},
      {"question_id": 3, "image": "c.jpg", "text": "Is there a tree in the image?", "label": "yes"}])
  suffix = "\nAnswer the question using a single word or phrase."
  questions = [
      {"question_id": 10, "image": "a.jpg", "text": "Is there a dog in the image?" + suffix, "category": "random"},
      {"question_id": 11, "image": "b.jpg", "text": "Is there a car in the image?" + suffix, "category": "popular"},
      {"question_id": 12, "image": "a.jpg", "text": "Is there a cat in the image?" + suffix, "category": "random"},
      {"question_id": 13, "image": "b.jpg", "text": "Is there a bus in the image?" + suffix, "category": "popular"},
      {"question_id": 14, "image": "c.jpg", "text": "Is there a tree in the image?" + suffix, "category": "popular"}]
  qfile = _jsonl(tmp_path / "q.jsonl", questions)
  # Answers out of order (a resumed, batched run): pairing follows the question file.
  answers = {14: "No", 10: "Yes", 13: "Yes, a bus.", 12: "There is no cat.", 11: "Yes"}
  afile = _jsonl(tmp_path / "a.jsonl", [{"question_id": k, "text": v} for k, v in answers.items()])
  results = pope.score_llava_layout(str(ann), qfile, afile)
  assert (results["random"]["TP"], results["random"]["TN"], results["random"]["accuracy"]) == (1, 1, 1.0)
  popular = results["popular"]  # car yes/yes TP, bus yes/no FP, tree no/yes FN
  assert (popular["TP"], popular["FP"], popular["TN"], popular["FN"]) == (1, 1, 0, 1)
  assert popular["f1"] == pytest.approx(0.5) and popular["yes_ratio"] == pytest.approx(2 / 3)
  assert pope.main(["--annotation-dir", str(ann), "--question-file", qfile, "--answers", afile]) == 0
  table = capsys.readouterr().out
  assert "popular" in table and "random" in table and table.splitlines()[-1].startswith("mean")

  # A misaligned question file is an error, not a silent wrong score.
  swapped = [questions[2], questions[1], questions[0], questions[3], questions[4]]
  with pytest.raises(ValueError, match="does not start question"):
    pope.score_llava_layout(str(ann), _jsonl(tmp_path / "q2.jsonl", swapped), afile)
  with pytest.raises(ValueError, match="2 labels but .* 1 questions of category 'random'"):
    pope.score_llava_layout(str(ann), _jsonl(tmp_path / "q3.jsonl", questions[1:]), afile)

  labels = _jsonl(tmp_path / "labels.jsonl", [{"question_id": 10, "label": "yes"}, {"question_id": 14,
                                                                                   "label": "yes"}])
  assert pope.score_by_id(labels, afile)["all"]["recall"] == pytest.approx(0.5)
  missing = _jsonl(tmp_path / "labels2.jsonl", [{"question_id": 99, "label": "no"}])
  with pytest.raises(KeyError, match="labels2.jsonl:1: no answer for question_id 99"):
    pope.score_by_id(missing, afile)
