"""`python -m llava_jax.datagen captions`: input formats, seeded instructions and image-tag placement, subsampling,
counted skips and errors naming the input."""
import collections
import json

import pytest

from llava_jax.datagen import __main__ as datagen_main
from llava_jax.datagen import captions, prompt_files

PAIRS = [{"image": f"img{i}.jpg", "caption": f"A photo number {i}."} for i in range(40)]


def _run(tmp_path, input_path, *extra):
  out = tmp_path / "out.json"
  assert datagen_main.main(["captions", "--input", str(input_path), "--output", str(out), *extra]) == 0
  return json.loads(out.read_text())


def _check_records(records, pairs_by_id):
  instructions = set(prompt_files.instruction_list("brief_description"))
  placements = collections.Counter()
  for r in records:
    assert set(r) == {"id", "image", "conversations"}
    human, gpt = r["conversations"]
    assert human["from"] == "human" and gpt["from"] == "gpt"
    if human["value"].startswith("<image>\n"):
      placements["before"] += 1
      instruction = human["value"][len("<image>\n"):]
    else:
      assert human["value"].endswith("\n<image>")
      placements["after"] += 1
      instruction = human["value"][:-len("\n<image>")]
    assert instruction in instructions
    assert (r["image"], gpt["value"]) == pairs_by_id[r["id"]]
  return placements


def test_json_list_jsonl_and_tsv_agree(tmp_path, capsys):
  (tmp_path / "p.json").write_text(json.dumps(PAIRS))
  (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
  (tmp_path / "p.tsv").write_text("image\tcaption\n" + "".join(f"{p['image']}\t{p['caption']}\n" for p in PAIRS))
  from_json = _run(tmp_path, tmp_path / "p.json")
  from_jsonl = _run(tmp_path, tmp_path / "p.jsonl")
  from_tsv = _run(tmp_path, tmp_path / "p.tsv")
  assert from_json == from_jsonl
  # TSV ids are line numbers (the header is line 0), so compare everything else.
  assert [(r["image"], r["conversations"]) for r in from_tsv] == [(r["image"], r["conversations"])
                                                                    for r in from_json]
  placements = _check_records(from_json, {f"{i:08d}": (p["image"], p["caption"]) for i, p in enumerate(PAIRS)})
  assert placements["before"] >= 8 and placements["after"] >= 8  # both placements, as in LLaVA's data
  assert len({r["conversations"][0]["value"] for r in from_json}) > 5  # instructions vary
  assert "pairs 40, skipped (empty caption) 0, written 40" in capsys.readouterr().out
  assert _run(tmp_path, tmp_path / "p.json", "--seed", "0") == from_json  # seeded
  assert _run(tmp_path, tmp_path / "p.json", "--seed", "1") != from_json


def test_coco_captions_subsample_prefix_and_skips(tmp_path, capsys):
  coco = {"images": [{"id": 7, "file_name": "000000000007.jpg"}, {"id": 9, "file_name": "000000000009.jpg"}],
          "annotations": [{"id": 100 + i, "image_id": 7 if i % 2 else 9, "caption": f"Caption {i}."}
                          for i in range(12)]}
  coco["annotations"][3]["caption"] = "   "
  (tmp_path / "coco.json").write_text(json.dumps(coco))
  records = _run(tmp_path, tmp_path / "coco.json", "--image-prefix", "coco/train2017/", "--max-samples", "5")
  assert "pairs 12, skipped (empty caption) 1, written 5" in capsys.readouterr().out
  assert len(records) == 5
  ids = [int(r["id"]) for r in records]
  assert ids == sorted(ids) and 103 not in ids  # file order kept; the empty caption is never chosen
  by_id = {str(a["id"]): (f"coco/train2017/{'000000000007' if a['image_id'] == 7 else '000000000009'}.jpg",
                          a["caption"]) for a in coco["annotations"]}
  _check_records(records, by_id)
  all_records = _run(tmp_path, tmp_path / "coco.json")
  assert len(all_records) == 11


def test_bad_input_names_the_file_and_record(tmp_path):
  (tmp_path / "bad.jsonl").write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps({"image": "x.jpg"}) + "\n")
  with pytest.raises(KeyError, match=r"bad.jsonl:2: needs keys 'image' and 'caption'"):
    captions.read_pairs(str(tmp_path / "bad.jsonl"))
  (tmp_path / "bad2.jsonl").write_text(json.dumps(PAIRS[0]) + "\n{oops\n")
  with pytest.raises(ValueError, match=r"bad2.jsonl:2: not valid JSON"):
    captions.read_pairs(str(tmp_path / "bad2.jsonl"))
  (tmp_path / "bad.tsv").write_text("a.jpg\tfine\nno tab here\n")
  with pytest.raises(ValueError, match=r"bad.tsv:2: expected 'image<TAB>caption'"):
    captions.read_pairs(str(tmp_path / "bad.tsv"))
  (tmp_path / "dup.json").write_text(json.dumps([{"id": "a", **PAIRS[0]}, {"id": "a", **PAIRS[1]}]))
  with pytest.raises(ValueError, match="duplicate record ids"):
    _run(tmp_path, tmp_path / "dup.json")
  (tmp_path / "keys.json").write_text(json.dumps([{"file": "a.jpg", "text": "A cat."}]))
  records = _run(tmp_path, tmp_path / "keys.json", "--image-key", "file", "--caption-key", "text")
  assert records[0]["image"] == "a.jpg" and records[0]["conversations"][1]["value"] == "A cat."
