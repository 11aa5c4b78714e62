"""Answer files: LLaVA's model_vqa records, answers equal to generations on hand-built prompts, resume after an interruption or
from a half-written file (each question answered exactly once), clear errors for bad questions."""
import json

import pytest

from llava_jax import generate
from llava_jax import generate_testing as testing
from llava_jax.eval import answer

KEYS = {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, llama_tokenizer_dir):
  """A model folder, an image folder and a question file: images of several sizes, two text-only questions."""
  root = tmp_path_factory.mktemp("answer")
  _, path = testing.tokenizer_model_folder(root, llama_tokenizer_dir)
  images = root / "images"
  images.mkdir()
  questions = []
  for i in range(7):
    q = {"question_id": f"q{i}", "text": ["What is this?", "Describe the scene.", "Is there a cat?"][i % 3],
         "category": "conv"}
    if i not in (2, 5):
      q["image"] = f"sub/img{i}.png"
      (images / "sub").mkdir(exist_ok=True)
      testing.random_image(i, size=(20 + 7 * i, 30)).save(images / q["image"])
    questions.append(q)
  qfile = root / "questions.jsonl"
  qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
  return path, images, qfile, questions, generate.Generator.from_folder(str(path))


def read(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_match_generations_on_hand_built_prompts(setup, tmp_path):
  path, images, qfile, questions, gen = setup
  out = tmp_path / "answers.jsonl"
  argv = ["--model", str(path), "--questions", str(qfile), "--image-folder", str(images), "--answers", str(out),
          "--batch-size", "4", "--max-new-tokens", "8"]
  assert answer.main(argv) == 0
  records = read(out)
  assert [r["question_id"] for r in records] == [q["question_id"] for q in questions]
  # the same batches built by hand as LLaVA's model_vqa.py does: '<image>\n' + text with the image, text alone
  requests = [gen.request([("human", "<image>\n" + q["text"])], [str(images / q["image"])]) if "image" in q
              else gen.request([("human", q["text"])]) for q in questions]
  params = gen.params(max_new_tokens=8)
  expected = [o.text.strip() for i in range(0, 7, 4) for o in gen.generate(requests[i:i + 4], params, min_rows=4)]
  assert any(expected)
  for q, r, text in zip(questions, records, expected):
    assert set(r) == KEYS
    assert r["prompt"] == q["text"] and r["model_id"] == "model" and r["metadata"] == {}
    assert r["text"] == text
  assert len({r["answer_id"] for r in records}) == len(records)


def test_resume_after_interruption_answers_each_question_once(setup, tmp_path, monkeypatch):
  path, images, qfile, questions, gen = setup
  questions = answer.read_questions(qfile)
  params = gen.params(max_new_tokens=8)
  out = tmp_path / "answers.jsonl"
  calls = []
  original = generate.Generator.generate

  def crash_on_second_batch(self, *a, **kw):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return original(self, *a, **kw)

  monkeypatch.setattr(generate.Generator, "generate", crash_on_second_batch)
  with pytest.raises(KeyboardInterrupt):
    answer.answer_questions(gen, questions, str(images), out, params, batch_size=3, progress=False)
  assert [r["question_id"] for r in read(out)] == ["q0", "q1", "q2"]
  monkeypatch.setattr(generate.Generator, "generate", original)
  assert answer.answer_questions(gen, questions, str(images), out, params, batch_size=3, progress=False) == 4
  assert sorted(r["question_id"] for r in read(out)) == sorted(q["question_id"] for q in questions)
  assert answer.answer_questions(gen, questions, str(images), out, params, batch_size=3, progress=False) == 0
  assert len(read(out)) == len(questions)


def test_resume_from_half_file_with_cut_last_line(setup, tmp_path):
  path, images, qfile, questions, gen = setup
  full = tmp_path / "full.jsonl"
  params = gen.params(max_new_tokens=8)
  answer.answer_questions(gen, questions, str(images), full, params, batch_size=4, progress=False)
  lines = full.read_text().splitlines(keepends=True)
  half = tmp_path / "half.jsonl"
  half.write_text("".join(lines[:3]) + lines[3][:25])  # a write cut off mid-line
  assert answer.answer_questions(gen, questions, str(images), half, params, batch_size=4, progress=False) == 4
  got = read(half)
  assert [r["question_id"] for r in got] == [q["question_id"] for q in questions]
  assert got[:3] == read(full)[:3]
  by_id = {r["question_id"]: r["text"] for r in read(full)}
  assert all(r["text"] == by_id[r["question_id"]] for r in got)


def test_bad_question_files(tmp_path):
  bad = tmp_path / "q.jsonl"
  bad.write_text('{"question_id": 1, "text": "a"}\n\n{"question_id": 1, "text": "b"}\n')  # line 2 is blank
  with pytest.raises(ValueError, match=r"q.jsonl:3: question_id 1 already used on line 1"):
    answer.read_questions(bad)
  bad.write_text('{"question_id": 1}\n')
  with pytest.raises(ValueError, match=r"q.jsonl:1: missing key 'text'"):
    answer.read_questions(bad)
  bad.write_text('{"question_id": 1, "text": "a", "image": ""}\n')
  with pytest.raises(ValueError, match=r"q.jsonl:1: 'image' must be a non-empty string"):
    answer.read_questions(bad)
  bad.write_text('{"question_id": [1], "text": "a"}\n')
  with pytest.raises(ValueError, match=r"q.jsonl:1: question_id must be a string or an integer, got \[1\]"):
    answer.read_questions(bad)


def test_default_answer_length_is_model_vqas(monkeypatch):
  """LLaVA's model_vqa.py (LLaVA-Bench, MM-Vet) generates up to 1024 tokens; --max-new-tokens overrides it."""
  captured = {}

  class Stop(Exception):
    pass

  class FakeGenerator:
    def params(self, **kw):
      captured.update(kw)
      raise Stop

  monkeypatch.setattr(answer, "read_questions", lambda path: [])
  monkeypatch.setattr(generate.Generator, "from_folder", staticmethod(lambda *a, **kw: FakeGenerator()))
  for extra, expected in (([], 1024), (["--max-new-tokens", "128"], 128)):
    with pytest.raises(Stop):
      answer.main(["--model", "m", "--questions", "q", "--answers", "a", *extra])
    assert captured["max_new_tokens"] == expected


def test_missing_image_names_question_and_file(setup, tmp_path):
  _, images, _, _, gen = setup
  questions = [{"question_id": "x9", "text": "What?", "image": "nope.png"}]
  with pytest.raises(ValueError, match=r"question_id 'x9': .*nope.png: image file not found"):
    answer.answer_questions(gen, questions, str(images), tmp_path / "a.jsonl", gen.params(max_new_tokens=4),
                            progress=False)


def test_model_name():
  assert answer.model_name("/x/llava-v1.5-7b") == "llava-v1.5-7b"
  assert answer.model_name("/x/run1/checkpoint-500/") == "run1_checkpoint-500"
