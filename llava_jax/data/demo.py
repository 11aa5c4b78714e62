"""Built-in demo dataset: images of coloured shapes with LLaVA-format training data and a held-out VQA split.

    python -m llava_jax.data.demo write --out DIR [--seed 0] [--image-size 56]
    python -m llava_jax.data.demo score --answers A.jsonl --truth DIR/heldout_answers.jsonl

No downloads; deterministic by seed. Each image shows `count` (1-4) identical shapes (one colour, one shape, one
size) on a white background, grouped on one side of the image. Every question is answerable from the pixels
alone with one word from a small set, so a tiny model can learn it in minutes and is at chance without images:
  color: red green blue yellow purple orange | shape: circle square triangle cross | count: 1 2 3 4 |
  position: left right top bottom (where the group's centre is) | size: small large.
Layout: the image is a 4x4 grid of cells (at 56 px the 14-px patches of a ViT); each shape sits at the centre
of its own cell, the cells drawn from the image's left/right/top/bottom half so that the group's centre is
clearly on that side, the group shifted by a shared jitter of up to 1/64 of the image; a large shape spans
0.8 cell, a small one 0.5 cell (at 56 px: 11 and 7 px). From 56 px up shapes are drawn without anti-aliasing
(exact colours); smaller images (down to 28 px) are drawn at twice the size or more and box-downsampled.

Files written (paths relative to DIR; images relative to DIR/images, LLaVA's --image_folder):
  stage1.json              [{id, image, conversations}]: '<image>' + a brief-description request -> a caption
  stage2.json              LLaVA's three kinds (conversation, detailed description, complex reasoning) plus
                           short-answer VQA items as in LLaVA-1.5's mix (each question followed by
                           "\\nAnswer the question using a single word or phrase."), shuffled
  heldout_questions.jsonl  {question_id, image, text, category} (`model_vqa` questions), other images
  heldout_answers.jsonl    {question_id, image, category, answer}; answers balanced per category
  scenes.jsonl             {image, scene}: what each image shows (for analysis and tests)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import string
import sys
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageDraw

from llava_jax.datagen import prompt_files

COLORS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (40, 70, 220), "yellow": (235, 200, 20),
          "purple": (140, 50, 190), "orange": (245, 130, 20)}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom")
COUNTS = (1, 2, 3, 4)
BACKGROUND = (255, 255, 255)
CATEGORIES = ("color", "shape", "count", "position", "size")
ANSWERS = {"color": tuple(COLORS), "shape": SHAPES, "count": tuple(str(c) for c in COUNTS),
           "position": POSITIONS, "size": SIZES}
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."

_GRID = 4  # cells per side
_SIDE = {"small": 0.125, "large": 0.2}  # fraction of the image side (cell = 0.25)
_JITTER = 1 / 64  # shared by the group; keeps every shape inside its cell
_CRISP_SIZE = 56  # smallest size drawn without supersampling
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


@dataclasses.dataclass(frozen=True)
class Scene:
  color: str
  shape: str
  size: str
  count: int
  position: str
  centres: tuple[tuple[float, float], ...]  # (x, y) of each shape, fractions of the image side
  arrangement: str  # single | row | column | grid (a 2x2 block) | group

  def answer(self, category: str) -> str:
    return str(self.count) if category == "count" else getattr(self, category)

  def to_json(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "centres": [list(c) for c in self.centres]}


def _side_of(cells: np.ndarray) -> str | None:
  """The side of the image the cells' centre is clearly on (None if it is not clear)."""
  dx, dy = (cells.mean(0) + 0.5) / _GRID - 0.5
  if abs(dx) >= 0.2 and abs(dx) >= 2.5 * abs(dy):
    return "left" if dx < 0 else "right"
  if abs(dy) >= 0.2 and abs(dy) >= 2.5 * abs(dx):
    return "top" if dy < 0 else "bottom"
  return None


def _arrangement_name(cells: np.ndarray) -> str:
  if len(cells) == 1:
    return "single"
  if len(set(cells[:, 1])) == 1:
    return "row"
  if len(set(cells[:, 0])) == 1:
    return "column"
  if len(cells) == 4 and np.ptp(cells[:, 0]) == 1 and np.ptp(cells[:, 1]) == 1:
    return "grid"
  return "group"


def sample_scene(rng: np.random.Generator, **fixed: Any) -> Scene:
  """A random scene; `fixed` pins attributes (color=, shape=, size=, count=, position=).

  The shapes sit at the centres of distinct cells of a 4x4 grid (so a 14-px-patch vision tower at 56 px sees
  each shape whole in one patch), chosen in the half of the image named by `position` such that the group's
  centre is clearly on that side; the group is then shifted by a small shared jitter.
  """
  unknown = set(fixed) - {"color", "shape", "size", "count", "position"}
  if unknown:
    raise ValueError(f"unknown scene attributes {sorted(unknown)}")
  pick = lambda name, values: fixed[name] if name in fixed else values[rng.integers(len(values))]
  color, shape, size = pick("color", tuple(COLORS)), pick("shape", SHAPES), pick("size", SIZES)
  count, position = int(pick("count", COUNTS)), pick("position", POSITIONS)
  half = {"left": lambda c, r: c < 2, "right": lambda c, r: c >= 2, "top": lambda c, r: r < 2,
          "bottom": lambda c, r: r >= 2}[position]
  region = np.array([(c, r) for r in range(_GRID) for c in range(_GRID) if half(c, r)])  # (column, row)
  while True:  # rejection sampling: a few tries at most
    cells = region[np.sort(rng.choice(len(region), size=count, replace=False))]
    if _side_of(cells) == position:
      break
  jx, jy = rng.uniform(-_JITTER, _JITTER, size=2)
  centres = tuple((round(float((c + 0.5) / _GRID + jx), 4), round(float((r + 0.5) / _GRID + jy), 4))
                  for c, r in cells)
  return Scene(color, shape, size, count, position, centres, _arrangement_name(cells))


def render_scene(scene: Scene, image_size: int = 56) -> Image.Image:
  """RGB image of `scene`, `image_size` pixels square.

  From 56 px up the shapes are drawn directly (exact colours, no anti-aliasing). Smaller images are drawn at an
  integer multiple >= 56 px and box-downsampled, so a 4-pixel circle and cross still differ (in their edges).
  """
  scale = -(-_CRISP_SIZE // image_size)  # ceil
  canvas = image_size * scale
  image = Image.new("RGB", (canvas, canvas), BACKGROUND)
  draw = ImageDraw.Draw(image)
  fill = COLORS[scene.color]
  side = round(_SIDE[scene.size] * canvas)
  arm = side // 3 if (side - side // 3) % 2 == 0 else side // 3 + 1  # cross arms centred exactly
  for cx, cy in scene.centres:
    x0, y0 = round(cx * canvas - side / 2), round(cy * canvas - side / 2)
    x1, y1 = x0 + side - 1, y0 + side - 1
    if scene.shape == "square":
      draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif scene.shape == "circle":
      draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif scene.shape == "triangle":
      draw.polygon([(x0 + (side - 1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    elif scene.shape == "cross":
      a0 = (side - arm) // 2
      draw.rectangle([x0, y0 + a0, x1, y0 + a0 + arm - 1], fill=fill)
      draw.rectangle([x0 + a0, y0, x0 + a0 + arm - 1, y1], fill=fill)
    else:
      raise ValueError(f"unknown shape {scene.shape!r}")
  return image if scale == 1 else image.resize((image_size, image_size), Image.Resampling.BOX)


# ---- Text ------------------------------------------------------------------------------------------------

def _plural(word: str) -> str:
  return word + "es" if word.endswith(("s", "x", "ch", "sh")) else word + "s"


def _noun(scene: Scene, word: str = "shape") -> str:
  return word if scene.count == 1 else _plural(word)


def _be(scene: Scene) -> str:
  return "is" if scene.count == 1 else "are"


def _things(scene: Scene, *, with_size: bool = True) -> str:
  """'a large red circle' / 'three small blue squares'."""
  number = "a" if scene.count == 1 else _NUMBER_WORDS[scene.count]
  size = f"{scene.size} " if with_size else ""
  return f"{number} {size}{scene.color} {_noun(scene, scene.shape)}"


def _where(scene: Scene) -> str:
  return {"left": "on the left side", "right": "on the right side", "top": "at the top",
          "bottom": "at the bottom"}[scene.position]


_QUESTIONS = {  # (singular, plural) templates per category
    "color": [("What color is the shape?", "What color are the shapes?"),
              ("What is the color of the shape?", "What is the color of the shapes?")],
    "shape": [("What shape is shown?", "What shape are the objects?"),
              ("Which shape is in the image?", "Which shape are the objects in the image?")],
    "count": [("How many shapes are there?",) * 2, ("How many objects are in the image?",) * 2],
    "position": [("Where is the shape?", "Where are the shapes?"),
                 ("On which side of the image is the shape?", "On which side of the image are the shapes?")],
    "size": [("Is the shape small or large?", "Are the shapes small or large?"),
             ("What size is the shape?", "What size are the shapes?")],
}


def short_question(scene: Scene, category: str, rng: np.random.Generator) -> str:
  templates = _QUESTIONS[category]
  return templates[rng.integers(len(templates))][0 if scene.count == 1 else 1]


def _sentence_answer(scene: Scene, category: str) -> str:
  the = f"The {_noun(scene)} {_be(scene)}"
  return {"color": f"{the} {scene.color}.",
          "shape": f"{'It is a' if scene.count == 1 else 'They are'} {_noun(scene, scene.shape)}.",
          "count": f"There {_be(scene)} {_NUMBER_WORDS[scene.count]} {_noun(scene, scene.shape)} in the image.",
          "position": f"{the} {_where(scene)} of the image.",
          "size": f"{the} {scene.size}."}[category]


def caption(scene: Scene, rng: np.random.Generator) -> str:
  things = _things(scene)
  options = [f"{things[0].upper()}{things[1:]} {_where(scene)}.",
             f"A white background with {things} {_where(scene)}.",
             f"{things[0].upper()}{things[1:]} drawn {_where(scene)} of the picture."]
  return options[rng.integers(len(options))]


def _with_image(text: str, rng: np.random.Generator) -> str:
  return f"<image>\n{text}" if rng.integers(2) else f"{text}\n<image>"


def _turns(pairs: list[tuple[str, str]], rng: np.random.Generator) -> list[dict[str, str]]:
  turns = []
  for i, (q, a) in enumerate(pairs):
    turns += [{"from": "human", "value": _with_image(q, rng) if i == 0 else q}, {"from": "gpt", "value": a}]
  return turns


def conversation(scene: Scene, rng: np.random.Generator) -> list[dict[str, str]]:
  categories = list(rng.permutation(CATEGORIES))[:rng.integers(3, 6)]
  pairs = [(short_question(scene, c, rng), _sentence_answer(scene, c)) for c in categories]
  other = sample_scene(rng)  # a yes/no question about a shape that may or may not be there
  probe = scene if rng.integers(2) else other
  q = f"Is there a {probe.color} {probe.shape} in the image?"
  present = probe.color == scene.color and probe.shape == scene.shape
  a = (f"Yes, there {_be(scene)} {_things(scene, with_size=False)} {_where(scene)}." if present else
       f"No. The image shows {_things(scene, with_size=False)}.")
  pairs.insert(rng.integers(1, len(pairs) + 1), (q, a))
  return _turns(pairs, rng)


def detailed_description(scene: Scene, rng: np.random.Generator, requests: list[str]) -> list[dict[str, str]]:
  layout = {"single": "", "row": ", in a row", "column": ", in a column", "grid": ", in a two-by-two grid",
            "group": ""}[scene.arrangement]
  pronoun = "It is" if scene.count == 1 else "They are"
  text = (f"The image shows {_things(scene)} on a plain white background. {pronoun} placed {_where(scene)} of "
          f"the image{layout}. {pronoun} {'the only object' if scene.count == 1 else 'the only objects'} in the "
          f"picture; the rest of the image is empty.")
  return _turns([(requests[rng.integers(len(requests))], text)], rng)


_LOOKALIKES = {"circle": "a coin or a wheel", "square": "a window pane or a square on a chessboard",
               "triangle": "a slice of pizza or a road warning sign", "cross": "a plus sign or a first-aid symbol"}
_NATURE = {"red": "ripe strawberries and tomatoes", "green": "leaves and grass", "blue": "a clear sky and the sea",
           "yellow": "bananas and lemons", "purple": "grapes and lavender", "orange": "oranges and carrots"}
_OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


def complex_reasoning(scene: Scene, rng: np.random.Generator) -> list[dict[str, str]]:
  things, n = _things(scene), scene.count
  kind = rng.integers(4)
  if kind == 0:
    pair = ("If one more identical shape were added, how many shapes would there be?",
            f"The image shows {things}. Adding one more identical shape would make {_NUMBER_WORDS[n + 1]} "
            f"{_plural(scene.shape)} in total.")
  elif kind == 1:
    moved = dataclasses.replace(scene, position=_OPPOSITE[scene.position])
    pair = ("What would change if the shapes were moved to the opposite side of the image?",
            f"The image shows {things} {_where(scene)}. Moved to the opposite side, "
            f"{'it' if n == 1 else 'they'} would be {_where(moved)} of the image, with the same color, shape "
            f"and size.")
  elif kind == 2:
    pair = ("What everyday object has a shape similar to what is shown?",
            f"The image shows {things}. A {scene.shape} looks like {_LOOKALIKES[scene.shape]}.")
  else:
    pair = ("What in nature often has the same color as the shapes in the image?",
            f"The shapes are {scene.color}, a color often seen in {_NATURE[scene.color]}.")
  return _turns([pair], rng)


def short_answers(scene: Scene, rng: np.random.Generator) -> list[dict[str, str]]:
  categories = list(rng.permutation(CATEGORIES))[:rng.integers(1, 4)]
  return _turns([(f"{short_question(scene, c, rng)}\n{SHORT_ANSWER_PROMPT}", scene.answer(c))
                 for c in categories], rng)


# ---- Writing ---------------------------------------------------------------------------------------------

def _save(scene: Scene, image_folder: str, rel: str, image_size: int, scenes_file) -> None:
  path = os.path.join(image_folder, rel)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  render_scene(scene, image_size).save(path, format="PNG")
  scenes_file.write(json.dumps({"image": rel, "scene": scene.to_json()}) + "\n")


def write_demo_dataset(out_dir: str | os.PathLike, *, seed: int = 0, num_stage1: int = 2000,
                       num_stage2: int = 4000, num_heldout: int = 500, image_size: int = 56,
                       short_answer_fraction: float = 0.6) -> dict[str, str]:
  """Writes the demo dataset under `out_dir` (see the module docstring); returns the paths by name:
  stage1, stage2, heldout_questions, heldout_answers, scenes, image_folder.

  `short_answer_fraction` of the stage-2 items are short-answer VQA; the rest split evenly (in turn) into
  conversation, detailed description and complex reasoning.
  """
  if image_size < 28:
    raise ValueError(f"image_size {image_size} < 28: small shapes would be 3 pixels or less")
  out_dir = os.fspath(out_dir)
  image_folder = os.path.join(out_dir, "images")
  paths = {name: os.path.join(out_dir, name + ext) for name, ext in (
      ("stage1", ".json"), ("stage2", ".json"), ("heldout_questions", ".jsonl"), ("heldout_answers", ".jsonl"),
      ("scenes", ".jsonl"))}
  paths["image_folder"] = image_folder
  os.makedirs(image_folder, exist_ok=True)
  rng1, rng2, rng3 = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
  brief = prompt_files.instruction_list("brief_description")
  detailed = prompt_files.instruction_list("detailed_description")

  with open(paths["scenes"], "w", encoding="utf-8") as scenes_file:
    stage1 = []
    for i in range(num_stage1):
      scene, rel = sample_scene(rng1), f"stage1/{i:06d}.png"
      _save(scene, image_folder, rel, image_size, scenes_file)
      stage1.append({"id": f"stage1_{i:06d}", "image": rel, "conversations": [
          {"from": "human", "value": _with_image(brief[rng1.integers(len(brief))], rng1)},
          {"from": "gpt", "value": caption(scene, rng1)}]})

    stage2 = []
    num_short = round(short_answer_fraction * num_stage2)
    for i in range(num_stage2):
      scene, rel = sample_scene(rng2), f"stage2/{i:06d}.png"
      _save(scene, image_folder, rel, image_size, scenes_file)
      if i < num_short:
        kind, turns = "short", short_answers(scene, rng2)
      else:
        kind = ("conversation", "detail", "complex")[(i - num_short) % 3]
        turns = {"conversation": lambda: conversation(scene, rng2),
                 "detail": lambda: detailed_description(scene, rng2, detailed),
                 "complex": lambda: complex_reasoning(scene, rng2)}[kind]()
      stage2.append({"id": f"stage2_{i:06d}_{kind}", "image": rel, "conversations": turns})
    stage2 = [stage2[j] for j in rng2.permutation(len(stage2))]

    questions, answers = [], []
    for i in range(num_heldout):
      category = CATEGORIES[i % len(CATEGORIES)]
      values = ANSWERS[category]
      value = values[(i // len(CATEGORIES)) % len(values)]  # balanced answers within each category
      scene = sample_scene(rng3, **{category: int(value) if category == "count" else value})
      rel = f"heldout/{i:06d}.png"
      _save(scene, image_folder, rel, image_size, scenes_file)
      text = f"{short_question(scene, category, rng3)}\n{SHORT_ANSWER_PROMPT}"
      questions.append({"question_id": i, "image": rel, "text": text, "category": category})
      answers.append({"question_id": i, "image": rel, "category": category, "answer": scene.answer(category)})

  for name, data in (("stage1", stage1), ("stage2", stage2)):
    with open(paths[name], "w", encoding="utf-8") as f:
      json.dump(data, f, indent=1)
  for name, data in (("heldout_questions", questions), ("heldout_answers", answers)):
    with open(paths[name], "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r) + "\n" for r in data)
  return paths


# ---- Scoring ---------------------------------------------------------------------------------------------

_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
  """Lower case, punctuation -> spaces, leading articles dropped, the first word; number words -> digits."""
  words = [w for w in text.lower().translate(_PUNCT).split()]
  while words and words[0] in ("a", "an", "the"):
    words = words[1:]
  if not words:
    return ""
  return str(_NUMBER_WORDS.index(words[0])) if words[0] in _NUMBER_WORDS else words[0]


def _answer_map(answers: Mapping[Any, str] | str | os.PathLike) -> dict[Any, str]:
  if isinstance(answers, (str, os.PathLike)):
    with open(answers, encoding="utf-8") as f:
      return {r["question_id"]: r["answer"] for r in map(json.loads, filter(str.strip, f))}
  return dict(answers)


def score_short_answers(predictions: Mapping[Any, str], answers: Mapping[Any, str] | str | os.PathLike) -> float:
  """Fraction of questions whose normalised prediction equals the answer; a missing prediction is wrong.

  `answers`: question_id -> answer, or the path of `heldout_answers.jsonl`.
  """
  truth = _answer_map(answers)
  if not truth:
    raise ValueError("no answers to score against")
  correct = sum(normalize_answer(predictions.get(qid, "")) == normalize_answer(a) for qid, a in truth.items())
  return correct / len(truth)


def score_by_category(predictions: Mapping[Any, str], answer_records: list[dict[str, Any]]) -> dict[str, float]:
  """Accuracy per category and 'all' from heldout_answers records."""
  groups: dict[str, dict[Any, str]] = {}
  for r in answer_records:
    groups.setdefault(r["category"], {})[r["question_id"]] = r["answer"]
    groups.setdefault("all", {})[r["question_id"]] = r["answer"]
  return {c: score_short_answers(predictions, a) for c, a in groups.items()}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m llava_jax.data.demo", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  w = sub.add_parser("write", help="write the dataset")
  w.add_argument("--out", required=True)
  w.add_argument("--seed", type=int, default=0)
  w.add_argument("--num-stage1", type=int, default=2000)
  w.add_argument("--num-stage2", type=int, default=4000)
  w.add_argument("--num-heldout", type=int, default=500)
  w.add_argument("--image-size", type=int, default=56)
  w.add_argument("--short-answer-fraction", type=float, default=0.6)
  s = sub.add_parser("score", help="accuracy of a model_vqa answer file on the held-out split")
  s.add_argument("--answers", required=True, help="answer JSONL {question_id, text}")
  s.add_argument("--truth", required=True, help="heldout_answers.jsonl")
  args = parser.parse_args(argv)
  if args.command == "write":
    paths = write_demo_dataset(args.out, seed=args.seed, num_stage1=args.num_stage1, num_stage2=args.num_stage2,
                               num_heldout=args.num_heldout, image_size=args.image_size,
                               short_answer_fraction=args.short_answer_fraction)
    print(json.dumps(paths, indent=1))
    return 0
  with open(args.answers, encoding="utf-8") as f:
    predictions = {r["question_id"]: r["text"] for r in map(json.loads, filter(str.strip, f))}
  with open(args.truth, encoding="utf-8") as f:
    records = [json.loads(line) for line in f if line.strip()]
  for category, accuracy in score_by_category(predictions, records).items():
    print(f"{category:<10} {100 * accuracy:6.2f}%")
  return 0


if __name__ == "__main__":
  sys.exit(main())
