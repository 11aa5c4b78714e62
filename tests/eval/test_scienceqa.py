"""ScienceQA conversion (LLaVA-1.5's CQM-A prompt) and answer extraction / accuracy on hand-made cases."""
import json

import pytest

from llava_jax.eval import scienceqa

PROBLEMS = {
    "1": {"question": "Which is a mammal?", "hint": "", "choices": ["shark", "whale"], "answer": 1,
          "image": None, "split": "test"},
    "4": {"question": "What is the capital of Utah?", "hint": "Look at the map.",
          "choices": ["Salt Lake City", "Provo", "Ogden"], "answer": 0, "image": "image.png", "split": "test"},
    "7": {"question": "Which word is a noun?", "hint": "", "choices": ["run", "table", "blue", "quickly"],
          "answer": 1, "image": "image.png", "split": "test"},
    "9": {"question": "Pick E.", "hint": "Five choices.", "choices": ["a", "b", "c", "d", "e"], "answer": 4,
          "image": None, "split": "test"},
    "12": {"question": "Which is hot?", "hint": "", "choices": ["ice", "fire", "snow"], "answer": 1,
           "image": "image.png", "split": "test"},
    "20": {"question": "Train only.", "hint": "", "choices": ["x", "y"], "answer": 0, "image": None,
           "split": "train"},
}


@pytest.mark.parametrize("text, expected", [
    ("B", "B"),  # rule 1: exactly a letter
    ("E", "E"),
    ("B.", "FAILED"),  # not a letter, too short for rule 2, no "The answer is"
    (" B", "FAILED"),  # no stripping, as in LLaVA
    ("b", "FAILED"),
    ("F", "FAILED"),  # not among A-E, and no rule 3 match
    ("C. fire", "C"),  # rule 2
    ("A. ", "A"),
    ("A.fire", "FAILED"),  # rule 2 needs '. '
    ("F. fire", "FAILED"),
    ("Because of heat. The answer is B.", "B"),  # rule 3
    ("The answer is B", "FAILED"),  # the regex needs one character after the letter
    ("The answer is AB", "A"),  # ... any character
    ("The answer is F.", "F"),  # rule 3 allows A-Z; scoring then counts it wrong
    ("The answer is A. No wait, the answer is B. The answer is C.", "FAILED"),  # two matches
    ("Answer: B", "FAILED"),
    ("", "FAILED"),
])
def test_extract_answer_rules(text, expected):
  assert scienceqa.extract_answer(text) == expected


def test_question_text_matches_cqm_a_format():
  assert scienceqa.question_text(PROBLEMS["1"]) == (
      "Which is a mammal?\nA. shark\nB. whale\nAnswer with the option's letter from the given choices directly.")
  assert scienceqa.question_text(PROBLEMS["4"], single_pred_prompt=False) == (
      "Context: Look at the map.\nWhat is the capital of Utah?\nA. Salt Lake City\nB. Provo\nC. Ogden")
  with pytest.raises(ValueError, match="6 choices"):
    scienceqa.question_text({"question": "q", "hint": "", "choices": list("abcdef"), "answer": 0})


def _write(tmp_path):
  (tmp_path / "problems.json").write_text(json.dumps(PROBLEMS))
  (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1", "4", "7", "9", "12"], "train": ["20"],
                                                        "bad": ["1", "999"]}))


def test_convert_cli(tmp_path, capsys):
  _write(tmp_path)
  out, train = tmp_path / "q.jsonl", tmp_path / "train.json"
  assert scienceqa.main(["convert", "--base-dir", str(tmp_path), "--split", "test", "--output", str(out),
                         "--llava-json", str(train)]) == 0
  assert "5 questions (3 with an image)" in capsys.readouterr().out
  questions = [json.loads(l) for l in out.read_text().splitlines()]
  assert [q["question_id"] for q in questions] == ["1", "4", "7", "9", "12"]
  assert questions[1] == {"question_id": "4", "image": "4/image.png", "category": "image",
                          "text": "Context: Look at the map.\nWhat is the capital of Utah?\nA. Salt Lake City\n"
                                  "B. Provo\nC. Ogden\nAnswer with the option's letter from the given choices "
                                  "directly."}
  assert "image" not in questions[0] and questions[0]["category"] == "no_image"
  records = json.loads(train.read_text())
  assert records[1]["image"] == "4/image.png"
  assert records[1]["conversations"][0]["value"].startswith("<image>\nContext: Look at the map.\n")
  assert records[1]["conversations"][1] == {"from": "gpt", "value": "A"}
  assert "image" not in records[3] and records[3]["conversations"][1]["value"] == "E"
  with pytest.raises(KeyError, match="absent from problems.json"):
    scienceqa.main(["convert", "--base-dir", str(tmp_path), "--split", "bad", "--output", str(out)])
  with pytest.raises(KeyError, match="no split 'val'"):
    scienceqa.main(["convert", "--base-dir", str(tmp_path), "--split", "val", "--output", str(out)])


def test_score_by_hand(tmp_path, capsys):
  _write(tmp_path)
  answers = [
      {"question_id": "1", "text": "B"},  # right (no image)
      {"question_id": "4", "text": "A. Salt Lake City"},  # right (image)
      {"question_id": "7", "text": "The answer is D."},  # wrong: D is a choice but not the answer (image)
      {"question_id": "9", "text": "The answer is E."},  # right (no image)
      # "12" (image) has no answer: wrong
      {"question_id": "20", "text": "A"},  # not in the split: ignored
  ]
  path = tmp_path / "answers.jsonl"
  path.write_text("".join(json.dumps({**a, "prompt": "p", "answer_id": "x", "model_id": "m", "metadata": {}})
                          + "\n" for a in answers))
  result_path = tmp_path / "result.json"
  assert scienceqa.main(["score", "--base-dir", str(tmp_path), "--answers", str(path),
                         "--output-result", str(result_path)]) == 0
  printed = capsys.readouterr().out
  assert "Total: 5, Correct: 3, Accuracy: 60.00%, IMG-Accuracy: 33.33% (1/3)" in printed
  result = json.loads(result_path.read_text())
  assert result["missing"] == 1 and result["failed_extraction"] == 1
  assert result["results"] == {"1": 1, "4": 0, "7": 3, "9": 4, "12": -1}

  # A letter beyond the problem's choices is wrong; so is one from the regex outside A-E.
  problems = {"3": {"question": "q", "hint": "", "choices": ["x", "y", "z"], "answer": 2, "image": None}}
  assert scienceqa.score(problems, ["3"], {"3": "D. x"})["correct"] == 0
  assert scienceqa.score(problems, ["3"], {"3": "The answer is F."})["results"] == {"3": -1}
  assert scienceqa.score(problems, ["3"], {"3": "C"})["acc"] == 100.0
