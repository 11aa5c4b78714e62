"""Tests of llava_jax.data.tfds_llava: ArrayRecord conversion, random access without TensorFlow, same samples."""
import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from llava_jax.data import pipeline, records, tfds_llava


@pytest.fixture(scope="module")
def converted(corpus, tmp_path_factory):
  out = tmp_path_factory.mktemp("tfds")
  path = tfds_llava.convert(str(corpus["bad_jsonl"]), str(corpus["images"]), str(out), name="bad")
  return out, path


def test_no_tensorflow_needed(corpus, tmp_path):
  """Convert and read in a fresh process: TensorFlow is never imported (and is not installed here)."""
  code = f"""
import sys
from llava_jax.data import tfds_llava
path = tfds_llava.convert({str(corpus["clean_json"])!r}, {str(corpus["images"])!r}, {str(tmp_path)!r})
src = tfds_llava.TfdsSource(path)
assert len(src) == {len(corpus["clean"])} and src[1]["text"]
assert "tensorflow" not in sys.modules
"""
  subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_examples_hold_the_records_and_image_bytes(corpus, converted):
  out, path = converted
  assert path.startswith(str(out))
  ds = tfds.builder_from_directory(path).as_data_source(split="train")
  assert type(ds).__name__ == "ArrayRecordDataSource"
  assert all(".array_record-" in f.name for f in __import__("pathlib").Path(path).glob("*-train.*"))
  texts = records.read_record_texts(str(corpus["bad_jsonl"]))
  assert len(ds) == len(texts)
  for i, (source, text) in enumerate(texts):  # file order, everything kept as it was read
    ex = ds[i]
    assert ex["source"].decode() == source and ex["record_json"].decode() == text
    try:
      names = records.parse_record(text, source).images
    except records.BadRecord:
      names = ()
    assert [n.decode() for n in ex["image_names"]] == list(names)
    for name, blob, found in zip(names, ex["image_bytes"], ex["image_found"]):
      file = corpus["images"] / name
      assert bool(found) == file.exists()
      assert bytes(blob) == (file.read_bytes() if file.exists() else b"")


def test_data_source_by_name(converted, corpus):
  out, _ = converted
  ds = tfds.data_source("llava_conversations/bad", data_dir=str(out), split="train")
  assert len(ds) == len(corpus["mixed"])


def test_source_matches_json_source(corpus, converted):
  _, path = converted
  tf_src = tfds_llava.TfdsSource(path)
  js_src = records.JsonSource(str(corpus["bad_jsonl"]), str(corpus["images"]))
  np.testing.assert_array_equal(tf_src.lengths, js_src.lengths)
  np.testing.assert_array_equal(tf_src.has_image, js_src.has_image)
  assert len(tf_src) == len(js_src)
  for i in range(len(js_src)):
    assert tf_src[i]["text"] == js_src[i]["text"] and tf_src[i]["source"] == js_src[i]["source"]
  # The folder above the dataset works too (one dataset below it).
  assert len(tfds_llava.TfdsSource(str(converted[0]))) == len(js_src)
  with pytest.raises(ValueError, match="expected one TFDS dataset"):
    tfds_llava.TfdsSource(str(corpus["root"]))


@pytest.mark.parametrize("group", [False, True])
def test_pipeline_gives_the_same_batches_as_json(corpus, converted, tokenizer, tiny_model_config, group):
  """Same seed: the TFDS path gives the JSON path's batches (ids, labels, images) and skip counts."""
  cfg = dict(max_length=96, length_buckets=(64,), batch_size=2, shuffle=True, seed=4, num_epochs=2,
             group_by_modality_length=group, drop_remainder=False, read_threads=1)
  from_json = pipeline.make_train_iterator(
      dict(cfg, data_files=[{"path": str(corpus["bad_jsonl"]), "image_folder": str(corpus["images"])}]),
      tokenizer, tiny_model_config, process_index=0, process_count=1)
  from_tfds = pipeline.make_train_iterator(dict(cfg, data_files=[converted[1]]), tokenizer, tiny_model_config,
                                           process_index=0, process_count=1)
  a, b = list(from_json), list(from_tfds)
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
  assert from_json.skip_stats.counts == from_tfds.skip_stats.counts
  assert from_tfds.skip_stats.counts["missing_image"] == 2 and from_tfds.skip_stats.counts["bad_image"] == 4  # 2 epochs


def test_mixture_of_json_and_tfds(corpus, converted, tokenizer, tiny_model_config):
  files = [{"path": str(corpus["clean_json"]), "image_folder": str(corpus["images"]), "weight": 1.0},
           {"path": converted[1], "weight": 2.0}]
  it = pipeline.make_train_iterator(dict(data_files=files, max_length=96, batch_size=3, shuffle=True, seed=0,
                                         drop_remainder=False, read_threads=1), tokenizer, tiny_model_config,
                                    process_index=0, process_count=1)
  seen = [int(i) for batch in it for i in batch["record_index"] if i >= 0]
  n_clean, n_bad = len(corpus["clean"]), len(corpus["mixed"])
  counts = np.bincount(seen, minlength=n_clean + n_bad)
  good_bad = [n_clean + i for i, x in enumerate(corpus["mixed"]) if isinstance(x, dict) and x in corpus["clean"]]
  expected = np.zeros(n_clean + n_bad, int)
  expected[:n_clean], expected[good_bad] = 1, 2  # weight 1 and weight 2; the bad records are skipped, twice
  np.testing.assert_array_equal(counts, expected)
  assert sum(it.skip_stats.counts.values()) == 2 * (n_bad - len(good_bad))


def test_cli(corpus, tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "llava_jax.data.tfds_llava", "--json", str(corpus["clean_json"]),
       "--image-folder", str(corpus["images"]), "--output", str(tmp_path)],
      check=True, capture_output=True, text=True, timeout=300)
  path = result.stdout.strip().splitlines()[-1]
  src = tfds_llava.TfdsSource(path)
  assert [json.loads(src[i]["text"]) for i in range(len(src))] == corpus["clean"]
