"""Demo dataset: determinism, LLaVA JSON shape, every answer checked against the pixels of its image (colour by
hue, count by connected components, position by centroid, size by extent, shape by row profile), balanced
answers, chance level without images, and the short-answer scorer."""
import collections
import colorsys
import hashlib
import itertools
import json
import os
import re

import numpy as np
from PIL import Image
import pytest
from scipy import ndimage

from llava_jax.data import demo
from llava_jax.models.config import IGNORE_INDEX

SIZES = dict(num_stage1=40, num_stage2=150, num_heldout=300)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  out = tmp_path_factory.mktemp("demo")
  return demo.write_demo_dataset(out, seed=7, **SIZES)


def _hue_name(rgb):
  h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
  assert s > 0.6 and v > 0.5, rgb
  deg = h * 360
  for name, lo, hi in (("red", -15, 15), ("orange", 15, 40), ("yellow", 40, 70), ("green", 90, 160),
                       ("blue", 200, 250), ("purple", 260, 320)):
    if lo <= deg < hi or lo <= deg - 360 < hi:
      return name
  raise AssertionError(f"hue {deg} of {rgb} is not a palette colour")


def _shape_name(mask):
  rows = mask.sum(1)
  h, w = mask.shape
  if mask.sum() == h * w:
    return "square"
  if rows[0] * 2 < rows[-1] and all(np.diff(rows) >= 0):
    return "triangle"
  assert list(rows) == list(rows[::-1]), rows
  if rows[0] == rows[1] and rows.max() == w and set(rows) == {rows[0], w}:
    return "cross"
  assert rows[0] < rows[1] <= rows[len(rows) // 2] == w, rows
  return "circle"


def analyse(path):
  """What the pixels show, found without the generator's code."""
  pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
  size = pixels.shape[0]
  fg = (pixels != 255).any(-1)
  colours = {tuple(c) for c in pixels[fg]}
  assert len(colours) == 1, colours  # one exact colour: no anti-aliasing at 56 px
  labels, count = ndimage.label(fg)
  comps = [labels[s] == i + 1 for i, s in enumerate(ndimage.find_objects(labels))]
  shapes = {_shape_name(c) for c in comps}
  extents = {max(c.shape) for c in comps}
  assert len(shapes) == 1 and len(extents) == 1, (shapes, extents)
  ys, xs = np.nonzero(fg)
  dx, dy = (xs.mean() + 0.5) / size - 0.5, (ys.mean() + 0.5) / size - 0.5
  major, minor = max(abs(dx), abs(dy)), min(abs(dx), abs(dy))
  assert major > 0.15 and major > 2 * minor, (dx, dy)  # the side is never ambiguous
  position = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("bottom" if dy > 0 else "top")
  return {"color": _hue_name(colours.pop()), "shape": shapes.pop(), "count": str(count), "position": position,
          "size": "large" if extents.pop() > 0.16 * size else "small"}


def _category_of(question):
  if question.startswith("How many"):
    return "count"
  for word, category in (("color", "color"), ("Where", "position"), ("side", "position"), ("size", "size"),
                         ("small or large", "size"), ("shape", "shape")):
    if word in question:
      return category
  raise AssertionError(question)


def _load(paths):
  with open(paths["stage1"]) as f:
    stage1 = json.load(f)
  with open(paths["stage2"]) as f:
    stage2 = json.load(f)
  with open(paths["heldout_questions"]) as f:
    questions = [json.loads(l) for l in f]
  with open(paths["heldout_answers"]) as f:
    answers = [json.loads(l) for l in f]
  return stage1, stage2, questions, answers


def _digest(folder):
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(folder)):
    dirs.sort()
    for name in sorted(files):
      h.update(name.encode())
      with open(os.path.join(root, name), "rb") as f:
        h.update(f.read())
  return h.hexdigest()


def test_deterministic_by_seed(tmp_path):
  small = dict(num_stage1=6, num_stage2=12, num_heldout=10)
  a = demo.write_demo_dataset(tmp_path / "a", seed=3, **small)
  b = demo.write_demo_dataset(tmp_path / "b", seed=3, **small)
  c = demo.write_demo_dataset(tmp_path / "c", seed=4, **small)
  assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
  assert sorted(a) == sorted(b) == ["heldout_answers", "heldout_questions", "image_folder", "scenes", "stage1",
                                    "stage2"]
  assert a["stage1"] == str(tmp_path / "a" / "stage1.json")
  del c


def test_llava_json_format(dataset):
  stage1, stage2, questions, answers = _load(dataset)
  assert len(stage1) == SIZES["num_stage1"] and len(stage2) == SIZES["num_stage2"]
  assert len(questions) == len(answers) == SIZES["num_heldout"]
  ids = [r["id"] for r in stage1 + stage2]
  assert len(set(ids)) == len(ids)
  for r in stage1 + stage2:
    assert set(r) == {"id", "image", "conversations"}
    assert os.path.isfile(os.path.join(dataset["image_folder"], r["image"]))
    turns = r["conversations"]
    assert len(turns) >= 2 and len(turns) % 2 == 0
    assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
    assert all(t["value"].strip() for t in turns)
    first = turns[0]["value"]
    assert first.startswith("<image>\n") or first.endswith("\n<image>")
    assert sum(t["value"].count("<image>") for t in turns) == 1
  assert all(len(r["conversations"]) == 2 for r in stage1)
  kinds = collections.Counter(r["id"].rsplit("_", 1)[1] for r in stage2)
  assert kinds == {"short": 90, "conversation": 20, "detail": 20, "complex": 20}
  for q, a in zip(questions, answers):
    assert q["question_id"] == a["question_id"] and q["image"] == a["image"] and q["category"] == a["category"]
    assert q["text"].endswith("\nAnswer the question using a single word or phrase.")
    assert "<image>" not in q["text"]
  held = {q["image"] for q in questions}
  assert not held & {r["image"] for r in stage1 + stage2}  # held-out images are new images


def test_every_answer_matches_the_pixels(dataset):
  stage1, stage2, questions, answers = _load(dataset)
  folder = dataset["image_folder"]
  with open(dataset["scenes"]) as f:
    scenes = {r["image"]: r["scene"] for r in map(json.loads, f)}
  seen = {}
  for image, scene in scenes.items():
    seen[image] = analyse(os.path.join(folder, image))
    assert seen[image] == {"color": scene["color"], "shape": scene["shape"], "count": str(scene["count"]),
                           "position": scene["position"], "size": scene["size"]}, image
  for a in answers:
    assert a["answer"] == seen[a["image"]][a["category"]]
  for q in questions:
    assert _category_of(q["text"]) == q["category"]
  short_turns = 0
  for r in stage2:
    truth, turns = seen[r["image"]], r["conversations"]
    for human, gpt in zip(turns[::2], turns[1::2]):
      question = human["value"].replace("<image>", "").strip()
      if question.endswith("Answer the question using a single word or phrase."):
        assert gpt["value"] == truth[_category_of(question)], (question, gpt["value"], truth)
        short_turns += 1
      elif question.startswith("Is there a "):
        color, shape = re.match(r"Is there a (\w+) (\w+) in the image\?", question).groups()
        present = color == truth["color"] and shape == truth["shape"]
        assert gpt["value"].startswith("Yes" if present else "No")
    text = " ".join(t["value"] for t in turns[1::2]).lower()
    if r["id"].endswith(("_conversation", "_detail")):
      assert truth["color"] in text and truth["shape"] in text
  assert short_turns >= 90
  numbers = {"1": "a", "2": "two", "3": "three", "4": "four"}
  for r in stage1:
    truth, caption = seen[r["image"]], r["conversations"][1]["value"].lower()
    words = caption.rstrip(".").split()
    assert truth["color"] in words and truth["size"] in words
    assert words[words.index(truth["color"]) + 1].startswith(truth["shape"])
    assert numbers[truth["count"]] in words
    assert {"left": "left", "right": "right", "top": "top", "bottom": "bottom"}[truth["position"]] in words


def test_answers_balanced_and_chance_without_images(dataset):
  _, stage2, questions, answers = _load(dataset)
  by_category = collections.defaultdict(collections.Counter)
  for a in answers:
    by_category[a["category"]][a["answer"]] += 1
  assert set(by_category) == set(demo.CATEGORIES)
  for category, counter in by_category.items():
    assert set(counter) == set(demo.ANSWERS[category])
    assert max(counter.values()) - min(counter.values()) <= 1, (category, counter)
  # An image-blind guesser (the most frequent answer of each exact question text, fitted on one half of the
  # questions and scored on the other) stays near chance.
  per_text = collections.defaultdict(collections.Counter)
  for q, a in list(zip(questions, answers))[::2]:
    per_text[q["text"]][a["answer"]] += 1
  scored = list(zip(questions, answers))[1::2]
  blind = np.mean([bool(per_text[q["text"]]) and per_text[q["text"]].most_common(1)[0][0] == a["answer"]
                   for q, a in scored])
  chance = np.mean([1 / len(demo.ANSWERS[c]) for c in demo.CATEGORIES])
  assert blind < chance + 0.1, (blind, chance)
  # Training short answers cover every value of every category.
  train = collections.defaultdict(set)
  for r in stage2:
    for human, gpt in zip(r["conversations"][::2], r["conversations"][1::2]):
      if "single word or phrase" in human["value"]:
        train[_category_of(human["value"].replace("<image>", "").strip())].add(gpt["value"])
  assert {c: sorted(v) for c, v in train.items()} == {c: sorted(v) for c, v in demo.ANSWERS.items()}


def test_small_images_keep_shapes_apart():
  for size in (28, 40):
    renders = {}
    for shape, scale in itertools.product(demo.SHAPES, demo.SIZES):
      scene = demo.Scene("blue", shape, scale, 1, "top", ((0.5, 0.25),), "single")
      image = demo.render_scene(scene, size)
      assert image.size == (size, size)
      renders[shape, scale] = np.asarray(image)
    for a, b in itertools.combinations(renders, 2):
      assert not np.array_equal(renders[a], renders[b]), (size, a, b)
  with pytest.raises(ValueError, match="image_size 20"):
    demo.write_demo_dataset("/nonexistent", image_size=20)


def test_score_short_answers(tmp_path):
  truth = {0: "red", 1: "2", 2: "left", 3: "small", 4: "circle", 5: "3"}
  predictions = {0: "Red.", 1: "two", 2: "The left side", 3: "large", 4: "circles", 6: "extra"}
  # right: 0 (case, punctuation), 1 (number word), 2 (article, first word); wrong: 3, 4 (plural), 5 (missing)
  assert demo.score_short_answers(predictions, truth) == pytest.approx(3 / 6)
  path = tmp_path / "answers.jsonl"
  path.write_text("".join(json.dumps({"question_id": k, "answer": v, "category": "c"}) + "\n"
                          for k, v in truth.items()))
  assert demo.score_short_answers(predictions, str(path)) == pytest.approx(0.5)
  assert demo.normalize_answer("  Four!  ") == "4" and demo.normalize_answer("...") == ""
  with pytest.raises(ValueError, match="no answers"):
    demo.score_short_answers(predictions, {})


def test_cli_write_and_score(tmp_path, capsys):
  assert demo.main(["write", "--out", str(tmp_path), "--num-stage1", "2", "--num-stage2", "3",
                    "--num-heldout", "10", "--seed", "1"]) == 0
  capsys.readouterr()
  with open(tmp_path / "heldout_answers.jsonl") as f:
    answers = [json.loads(l) for l in f]
  # A perfect answer file except for the two count questions (ids 2 and 7).
  preds = tmp_path / "preds.jsonl"
  preds.write_text("".join(json.dumps({"question_id": a["question_id"],
                                       "text": "wrong" if a["category"] == "count" else a["answer"].upper()})
                           + "\n" for a in answers))
  assert demo.main(["score", "--answers", str(preds), "--truth", str(tmp_path / "heldout_answers.jsonl")]) == 0
  lines = dict(line.split() for line in capsys.readouterr().out.splitlines())
  assert lines["count"] == "0.00%" and lines["color"] == "100.00%" and lines["all"] == "80.00%"


def _supervised_spans(labels):
  """Runs of supervised label ids (the assistant answers), in order."""
  spans, current = [], []
  for t in labels:
    if t == IGNORE_INDEX:
      if current:
        spans.append(current)
      current = []
    else:
      current.append(int(t))
  return spans + ([current] if current else [])


@pytest.mark.parametrize("split, template", [("stage1", "plain"), ("stage2", "vicuna_v1")])
def test_loads_through_the_training_pipeline(tmp_path, tokenizer, tiny_model_config, split, template):
  """Every record becomes a training row (strict bad-input policy) whose supervised tokens are its answers."""
  from llava_jax.data import pipeline
  paths = demo.write_demo_dataset(tmp_path, seed=2, num_stage1=12, num_stage2=30, num_heldout=5, image_size=28)
  with open(paths[split]) as f:
    data = json.load(f)
  config = dict(data_files=[{"path": paths[split], "image_folder": paths["image_folder"]}], template=template,
                max_length=256, batch_size=8, shuffle=False, num_epochs=1, read_threads=1, bad_input="strict")
  seen = []
  for batch in pipeline.make_eval_iterator(config, tokenizer, tiny_model_config, process_index=0,
                                           process_count=1):
    assert batch["images"].shape[1:] == (28, 28, 3)
    for b in np.nonzero(batch["row_valid"])[0]:
      record = data[int(batch["record_index"][b])]
      spans = _supervised_spans(batch["labels"][b])
      answers = [t["value"] for t in record["conversations"][1::2]]
      assert [tokenizer.decode(s, skip_special_tokens=True).strip() for s in spans] == answers
      seen.append(int(batch["record_index"][b]))
  assert sorted(seen) == list(range(len(data)))
