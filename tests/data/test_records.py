"""Tests of llava_jax.data.records: reading LLaVA JSON/JSONL, validation reasons, mixtures, the skip policy."""
import json
import logging
import pickle

import numpy as np
import pytest

from llava_jax.data import records
from llava_jax.data import templates

# Reasons that `parse_record` finds from the text alone (the rest need images or the tokenizer).
TEXT_REASONS = ("malformed_json", "malformed_record", "empty_conversation", "unknown_role", "turn_order",
                "image_tag_mismatch")


def test_json_list_and_jsonl_give_the_same_records(corpus):
  from_list = records.read_record_texts(str(corpus["clean_json"]))
  from_lines = records.read_record_texts(str(corpus["clean_jsonl"]))
  assert [json.loads(t) for _, t in from_list] == corpus["clean"]
  assert [json.loads(t) for _, t in from_lines] == corpus["clean"]
  assert from_list[3][0] == f"{corpus['clean_json']}[3]"
  assert from_lines[3][0] == f"{corpus['clean_jsonl']}:4"  # 1-based line numbers


def test_a_byte_order_mark_is_not_content(corpus, tmp_path):
  """Files saved with a UTF-8 BOM (some Windows editors) read as the same records, list or JSONL."""
  for name in ("clean_json", "clean_jsonl"):
    path = tmp_path / corpus[name].name
    path.write_bytes(b"\xef\xbb\xbf" + corpus[name].read_bytes())
    assert [json.loads(t) for _, t in records.read_record_texts(str(path))] == corpus["clean"]


def test_parse_clean_records(corpus):
  for source, text in records.read_record_texts(str(corpus["clean_json"])):
    parsed = records.parse_record(text, source)
    raw = json.loads(text)
    assert parsed.id == raw["id"]
    assert parsed.conversations == raw["conversations"]
    image = raw.get("image")
    assert parsed.images == (() if image is None else (image,) if isinstance(image, str) else tuple(image))


def test_each_bad_line_gives_its_reason(corpus):
  lines = records.read_record_texts(str(corpus["bad_jsonl"]))
  assert len(lines) == len(corpus["mixed"])  # the trailing blank line is not a record
  seen = {}
  for source, text in lines:
    try:
      records.parse_record(text, source)
    except records.BadRecord as e:
      rid = records.record_id(text, source)
      seen[rid] = e.reason
      assert source in e.detail
  for reason, bad in corpus["bad"].items():
    for item in bad:
      if reason not in TEXT_REASONS:
        continue
      rid = item["id"] if isinstance(item, dict) else None
      if rid is None:  # the malformed line is named by its position
        (rid,) = [r for r, why in seen.items() if why == "malformed_json"]
        assert rid.startswith(f"{corpus['bad_jsonl']}:")
      assert seen.pop(rid) == reason, rid
  assert not seen, f"records rejected that should not be: {seen}"


def test_roles_agree_with_templates():
  """records' role check accepts exactly what the templates accept (no record passes one and fails the other)."""
  for role in records.HUMAN_ROLES + ("Human", "USER"):
    templates.normalize_messages([(role, "a"), ("gpt", "b")])
    records.parse_record(json.dumps({"conversations": [{"from": role, "value": "a"},
                                                       {"from": "gpt", "value": "b"}]}), "x")
  for role in ("system", "bot", "model"):
    with pytest.raises(ValueError):
      templates.normalize_messages([(role, "a"), ("gpt", "b")])
    with pytest.raises(records.BadRecord, match="unknown_role"):
      records.parse_record(json.dumps({"conversations": [{"from": role, "value": "a"},
                                                         {"from": "gpt", "value": "b"}]}), "x")


def test_record_id_falls_back_to_position():
  assert records.record_id('{"id": 12, "conversations": []}', "f:3") == "12"
  assert records.record_id('{"conversations": []}', "f:3") == "f:3"
  assert records.record_id("{not json", "f:4") == "f:4"


def test_broken_json_list_file_raises_naming_it(tmp_path):
  path = tmp_path / "broken.json"
  path.write_text('[{"id": "a", "conversations": []}, {"id": ')
  with pytest.raises(ValueError, match="broken.json"):
    records.read_record_texts(str(path))


def test_json_source_is_compact_and_picklable(corpus):
  src = records.JsonSource(str(corpus["clean_jsonl"]), str(corpus["images"]))
  assert len(src) == len(corpus["clean"])
  clone = pickle.loads(pickle.dumps(src))
  for i in range(len(src)):
    assert clone[i] == src[i]
    assert json.loads(src[i]["text"]) == corpus["clean"][i]
    assert src[i]["image_folder"] == str(corpus["images"])
  words = [sum(len(t["value"].split()) for t in r["conversations"]) for r in corpus["clean"]]
  np.testing.assert_array_equal(src.lengths, words)
  np.testing.assert_array_equal(src.has_image, ["image" in r for r in corpus["clean"]])
  assert records.JsonSource(str(corpus["clean_jsonl"])).image_folder == str(corpus["root"])


def test_parse_data_files_forms():
  assert records.parse_data_files("a.json") == [records.DataFile("a.json")]
  spec = [{"path": "a.json", "image_folder": "imgs", "weight": 2}, "b.jsonl"]
  assert records.parse_data_files(spec) == [records.DataFile("a.json", "imgs", 2.0), records.DataFile("b.jsonl")]
  with pytest.raises(ValueError, match="unknown"):
    records.parse_data_files([{"path": "a.json", "wieght": 2}])
  with pytest.raises(ValueError, match="weight"):
    records.parse_data_files([{"path": "a.json", "weight": -1}])
  with pytest.raises(ValueError, match="no data files"):
    records.parse_data_files([])


def test_mixture_weights(corpus):
  a = records.JsonSource(str(corpus["clean_json"]), str(corpus["images"]))  # 12 records
  b = records.JsonSource(str(corpus["bad_jsonl"]), str(corpus["images"]))
  mix = records.MixtureSource([a, b], [2.0, 0.5])
  assert len(mix) == len(a) + len(b)
  assert mix[len(a) + 1] == b[1] and mix[5] == a[5]
  draws = []
  for epoch in range(3):
    idx = mix.epoch_indices(np.random.default_rng([0, epoch]))
    counts = np.bincount(idx, minlength=len(mix))
    assert np.all(counts[:len(a)] == 2)  # weight 2: every record twice
    picked = counts[len(a):]
    assert set(picked) <= {0, 1} and picked.sum() == round(0.5 * len(b))  # weight 0.5: half, without repeats
    draws.append(tuple(np.flatnonzero(picked)))
  assert len(set(draws)) > 1  # a different half in different epochs
  np.testing.assert_array_equal(mix.epoch_indices(np.random.default_rng([0, 1])),
                                mix.epoch_indices(np.random.default_rng([0, 1])))


def test_skip_stats_policy(caplog):
  stats = records.SkipStats("skip")
  with caplog.at_level(logging.WARNING):
    stats.add("rec-7", "missing_image", "f:3: image file x.png does not exist")
    stats.add("rec-8", "too_long", "f:4: ...")
    stats.add("rec-9", "too_long", "f:5: ...")
  assert stats.counts == {"missing_image": 1, "too_long": 2}
  assert "rec-7" in caplog.text and "missing_image" in caplog.text and "rec-9" in caplog.text
  assert stats.summary() == "bad input: skipped 3 record(s): missing_image=1, too_long=2"
  with caplog.at_level(logging.WARNING):
    stats.add_truncated("rec-10", 7, 2048)
    stats.add_truncated("rec-11", 2, 2048)
  assert "rec-10" in caplog.text and "7 supervised token(s) cut" in caplog.text
  assert stats.total == 3  # kept, not skipped
  assert stats.summary() == ("bad input: skipped 3 record(s): missing_image=1, too_long=2; truncated 2 kept "
                             "record(s) to max_length, cutting 9 supervised token(s)")
  restored = records.SkipStats("skip")
  restored.set_state(json.loads(json.dumps(stats.state())))
  assert restored.counts == stats.counts and restored.summary() == stats.summary()
  older = records.SkipStats("skip")
  older.set_state({"missing_image": 1})  # a state saved before the truncation counts existed
  assert older.counts == {"missing_image": 1} and older.truncated_records == 0

  strict = records.SkipStats("strict")
  with pytest.raises(records.BadInputError, match=r"'rec-7'.*missing_image.*x\.png"):
    strict.add("rec-7", "missing_image", "f:3: image file x.png does not exist")
  with pytest.raises(ValueError, match="bad_input"):
    records.SkipStats("ignore")


def test_iter_parsed_counts_and_strict(corpus):
  src = records.JsonSource(str(corpus["bad_jsonl"]), str(corpus["images"]))
  stats = records.SkipStats("skip")
  good = list(records.iter_parsed(src, stats=stats))
  expected = {r: len(v) for r, v in corpus["bad"].items() if r in TEXT_REASONS}
  assert dict(stats.counts) == expected
  assert len(good) == len(corpus["mixed"]) - sum(expected.values())
  with pytest.raises(records.BadInputError, match="malformed_record_1.*malformed_record"):
    list(records.iter_parsed(records.JsonSource(str(corpus["single"] / "malformed_record.jsonl")), "strict"))
