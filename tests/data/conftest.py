"""Fixtures of tests/data: a tiny model config, the tokenizer, and LLaVA-format corpora (clean and bad input).

The corpora are written by the fixtures (PNG/JPEG with PIL, a truncated PNG, a text file named .jpg, a JSONL
with a malformed line); nothing binary is committed.
"""
import json
import pathlib

import numpy as np
from PIL import Image
import pytest

from llava_jax.models.config import ModelConfig, VisionConfig

# Each bad record's id names the reason the pipeline must report for it.
QUESTION = "<image>\nWhat colour is the square?"


def _turns(*texts):
  return [{"from": ("human", "gpt")[i % 2], "value": t} for i, t in enumerate(texts)]


@pytest.fixture(scope="session")
def tiny_model_config():
  """28 px images in 14 px patches: 4 positions per image."""
  return ModelConfig(vision=VisionConfig(image_size=28, patch_size=14, hidden_size=8, intermediate_size=16,
                                         num_hidden_layers=1, num_attention_heads=2))


@pytest.fixture(scope="session")
def tokenizer(llama_tokenizer_dir):
  import transformers
  return transformers.AutoTokenizer.from_pretrained(str(llama_tokenizer_dir))


def _write_images(folder: pathlib.Path):
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  names = []
  for i, (w, h) in enumerate([(28, 28), (40, 30), (30, 44), (28, 28), (64, 32), (33, 33)]):
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    name = f"img{i}.png" if i % 2 == 0 else f"img{i}.jpg"
    Image.fromarray(arr).save(folder / name)
    names.append(name)
  Image.fromarray(rng.integers(0, 256, size=(20, 20, 4), dtype=np.uint8), "RGBA").save(folder / "rgba.png")
  names.append("rgba.png")
  full = (folder / "img0.png").read_bytes()
  (folder / "truncated.png").write_bytes(full[:len(full) // 2])
  (folder / "not_an_image.jpg").write_text("this is text, not a JPEG\n")
  return names


def clean_records(names):
  """Good records: one image, text-only, two images, multi-turn, image tag after the text, unicode."""
  out = []
  for i in range(12):
    kind = i % 6
    if kind == 0:
      out.append({"id": f"one_image_{i}", "image": names[i % 7],
                  "conversations": _turns(QUESTION, f"It is red {i}.")})
    elif kind == 1:
      out.append({"id": f"text_only_{i}", "conversations": _turns(f"What is {i} plus 2?", f"{i + 2}.")})
    elif kind == 2:
      out.append({"id": f"two_images_{i}", "image": [names[(i + 1) % 7], names[(i + 2) % 7]],
                  "conversations": _turns("<image>\n<image>\nCompare the pictures.", "The first is brighter.")})
    elif kind == 3:
      out.append({"id": f"multi_turn_{i}", "image": names[(i + 3) % 7],
                  "conversations": _turns(QUESTION, "Blue.", "And the circle?", "Green, mostly.",
                                          "How many shapes?", "Three shapes in total, one per row.")})
    elif kind == 4:
      out.append({"id": f"tag_last_{i}", "image": names[(i + 4) % 7],
                  "conversations": _turns("Describe this image.\n<image>", "A noisy picture with many colours.")})
    else:
      out.append({"id": f"unicode_{i}", "conversations": _turns("Übersetze: «chat» — 猫?", "Katze 🐱, 猫.")})
  return out


# reason -> JSONL lines (records, or raw text for a malformed line) that must be skipped with that reason.
def bad_lines():
  long_question = "<image>\n" + " ".join(f"word{i}" for i in range(120))
  return {
      "malformed_json": ['{"id": "malformed_json_1", "conversations": [{"from": "human", "value": "hi"'],
      "malformed_record": [{"id": "malformed_record_1", "image": "img0.png"},
                           {"id": "malformed_record_2", "conversations": ["just a string"]},
                           {"id": "malformed_record_3", "conversations": _turns("a", "b"), "image": 7}],
      "empty_conversation": [{"id": "empty_conversation_1", "conversations": []}],
      "unknown_role": [{"id": "unknown_role_1",
                        "conversations": [{"from": "system", "value": "x"}, {"from": "gpt", "value": "y"}]}],
      "turn_order": [{"id": "turn_order_1", "conversations": [{"from": "gpt", "value": "x"},
                                                              {"from": "human", "value": "y"}]},
                     {"id": "turn_order_2", "conversations": _turns("a", "b") + [{"from": "gpt", "value": "c"}]}],
      "image_tag_mismatch": [{"id": "image_tag_mismatch_1", "image": "img0.png",
                              "conversations": _turns("No tag here.", "Fine.")},
                             {"id": "image_tag_mismatch_2", "conversations": _turns(QUESTION, "No image.")}],
      "missing_image": [{"id": "missing_image_1", "image": "does_not_exist.png",
                         "conversations": _turns(QUESTION, "Red.")}],
      "bad_image": [{"id": "bad_image_1", "image": "truncated.png", "conversations": _turns(QUESTION, "Red.")},
                    {"id": "bad_image_2", "image": "not_an_image.jpg", "conversations": _turns(QUESTION, "Red.")}],
      "no_labels": [{"id": "no_labels_1", "image": "img1.jpg", "conversations": _turns(QUESTION)}],
      "too_long": [{"id": "too_long_1", "image": "img2.png", "conversations": _turns(long_question, "Red.")}],
  }


BAD_MAX_LENGTH = 96  # max_length for the bad corpus: too_long_1 (120+ words) does not fit, the clean ones do.


def _line(x):
  return x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
  """Paths: root, images, clean.json (JSON list), clean.jsonl, bad.jsonl (clean records interleaved with one
  of each bad case), single/<reason>.jsonl (one good record then the bad ones), and the records."""
  root = tmp_path_factory.mktemp("llava_corpus")
  images = root / "images"
  names = _write_images(images)
  clean = clean_records(names)
  (root / "clean.json").write_text(json.dumps(clean, ensure_ascii=False, indent=1))
  (root / "clean.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in clean))
  bad = bad_lines()
  mixed = []
  for k, (reason, lines) in enumerate(bad.items()):
    mixed.append(clean[k % len(clean)])
    mixed.extend(lines)
  (root / "bad.jsonl").write_text("\n".join(_line(x) for x in mixed) + "\n\n")  # a blank line is not a record
  (root / "single").mkdir()
  for reason, lines in bad.items():
    (root / "single" / f"{reason}.jsonl").write_text("\n".join(_line(x) for x in [clean[0]] + lines) + "\n")
  return {"root": root, "images": images, "names": names, "clean": clean, "bad": bad, "mixed": mixed,
          "clean_json": root / "clean.json", "clean_jsonl": root / "clean.jsonl", "bad_jsonl": root / "bad.jsonl",
          "single": root / "single"}
