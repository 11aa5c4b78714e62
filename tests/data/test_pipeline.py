"""Tests of llava_jax.data.pipeline: bad-input policy, batch contract, truncation, order, sharding, resume."""
import json
import logging
import math

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llava_jax.data import images, pipeline, records, tokenize
from llava_jax.models.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX

N = 4  # positions per image of the tiny model config (28 px / 14 px patches)


def _config(corpus, path=None, **kw):
  cfg = dict(data_files=[{"path": str(path or corpus["clean_json"]), "image_folder": str(corpus["images"])}],
             max_length=96, length_buckets=(32, 64), batch_size=4, shuffle=False, num_epochs=1, read_threads=1)
  cfg.update(kw)
  return cfg


def _batches(corpus, tokenizer, model_config, path=None, *, pi=0, pc=1, eval_=False, **kw):
  make = pipeline.make_eval_iterator if eval_ else pipeline.make_train_iterator
  it = make(_config(corpus, path, **kw), tokenizer, model_config, process_index=pi, process_count=pc)
  return it, list(it)


def _expand(ids, labels):
  """LLaVA's expansion, written out: each placeholder -> N positions with IGNORE_INDEX labels."""
  out = []
  for t, l in zip(ids, labels):
    out.extend([IGNORE_INDEX] * N if t == IMAGE_TOKEN_INDEX else [l])
  return np.asarray(out, np.int32)


def _reference_row(corpus, tokenizer, record, max_length, template="vicuna_v1"):
  """What LLaVA trains on for one record: expanded labels truncated to max_length, and the image arrays."""
  ids, labels = tokenize.encode_conversation(record["conversations"], tokenizer, template)
  names = record.get("image", [])
  names = [names] if isinstance(names, str) else names
  pixels = [images.preprocess_image(images.load_image(corpus["images"] / n), image_size=28, aspect="pad")
            for n in names]
  return ids, labels, _expand(ids, labels)[:max_length], pixels


def _check_row(batch, b, corpus, tokenizer, record, max_length, image_offset):
  ids, labels, llava_labels, pixels = _reference_row(corpus, tokenizer, record, max_length)
  mask = batch["attention_mask"][b].astype(bool)
  t = int(mask.sum())
  assert mask[:t].all() and not mask[t:].any()  # right padding
  row_ids, row_labels = batch["input_ids"][b, :t], batch["labels"][b, :t]
  np.testing.assert_array_equal(row_ids, ids[:t])  # a prefix of the full encoding, unchanged
  np.testing.assert_array_equal(row_labels, labels[:t])
  assert (batch["input_ids"][b, t:] == 0).all() and (batch["labels"][b, t:] == IGNORE_INDEX).all()
  ours = _expand(row_ids, row_labels)
  assert len(ours) == batch["num_tokens"][b] <= max_length
  # Same loss as LLaVA's truncation after expansion: equal where ours has positions, nothing supervised after.
  np.testing.assert_array_equal(ours, llava_labels[:len(ours)])
  assert (llava_labels[len(ours):] == IGNORE_INDEX).all()
  n = int((row_ids == IMAGE_TOKEN_INDEX).sum())
  assert batch["num_images"][b] == n
  for k in range(n):
    np.testing.assert_allclose(batch["images"][image_offset + k], pixels[k], rtol=0, atol=1e-6)
  return n


def _check_batch(batch, corpus, tokenizer, record_list, max_length, length_buckets=(32, 64, 96)):
  assert batch["input_ids"].shape[1] in length_buckets
  assert batch["input_ids"].shape[1] >= batch["num_tokens"].max()
  smaller = [L for L in length_buckets if L < batch["input_ids"].shape[1]]
  assert all(L < batch["num_tokens"].max() for L in smaller)  # the smallest bucket that fits
  offset = 0
  for b in range(len(batch["row_valid"])):
    if not batch["row_valid"][b]:
      assert (batch["labels"][b] == IGNORE_INDEX).all() and not batch["attention_mask"][b].any()
      assert batch["record_index"][b] == -1 and batch["num_images"][b] == 0
      continue
    assert (batch["labels"][b] != IGNORE_INDEX).any()  # never a silently all-masked row
    offset += _check_row(batch, b, corpus, tokenizer, record_list[batch["record_index"][b]], max_length, offset)
  assert offset == batch["image_valid"].sum() == (batch["input_ids"] == IMAGE_TOKEN_INDEX).sum()
  assert batch["image_valid"][:offset].all() and not batch["images"][offset:].any()


def test_clean_batches_match_the_reference(corpus, tokenizer, tiny_model_config):
  _, batches = _batches(corpus, tokenizer, tiny_model_config)
  assert len(batches) == len(corpus["clean"]) // 4
  seen = []
  for batch in batches:
    assert batch["input_ids"].dtype == np.int32 and batch["labels"].dtype == np.int32
    assert batch["attention_mask"].dtype == np.int32 and batch["images"].dtype == np.float32
    assert batch["images"].shape[1:] == (28, 28, 3) and batch["image_valid"].dtype == bool
    assert batch["images"].shape[0] in (0, 1, 2, 4) or batch["images"].shape[0] % 4 == 0
    _check_batch(batch, corpus, tokenizer, corpus["clean"], 96)
    seen.extend(batch["record_index"])
  assert seen == list(range(len(corpus["clean"])))  # shuffle=False: file order


def test_truncation_after_expansion(corpus, tokenizer, tiny_model_config):
  """max_length 56 cuts most records: what is kept has the loss of LLaVA's truncation; the two-image records
  (first supervised token at position 58) have nothing left and are skipped as too_long."""
  it, batches = _batches(corpus, tokenizer, tiny_model_config, max_length=56, length_buckets=(52,),
                         drop_remainder=False)
  assert dict(it.skip_stats.counts) == {"too_long": 2}
  assert sorted(_order(batches)) == [i for i, r in enumerate(corpus["clean"]) if "two_images" not in r["id"]]
  cuts = []  # supervised tokens each kept record loses to LLaVA's truncation after expansion
  for i in _order(batches):
    _, labels, llava_labels, _ = _reference_row(corpus, tokenizer, corpus["clean"][i], 56)
    cuts.append(int(np.sum(labels != IGNORE_INDEX) - np.sum(llava_labels != IGNORE_INDEX)))
  assert sum(c > 0 for c in cuts) > 0
  assert (it.skip_stats.truncated_records, it.skip_stats.truncated_labels) == (sum(c > 0 for c in cuts), sum(cuts))
  assert f"truncated {sum(c > 0 for c in cuts)} kept record(s)" in it.summary()
  assert any(b["num_tokens"].max() == 56 for b in batches)
  for batch in batches:
    _check_batch(batch, corpus, tokenizer, corpus["clean"], 56, (52, 56))


def test_training_data_with_no_usable_record_raises(corpus, tokenizer, tiny_model_config, tmp_path):
  """A wrong image folder: every record is skipped, and the endless training iterator says so instead of
  searching forever."""
  with_images = [r for r in corpus["clean"] if "image" in r][:3]
  (tmp_path / "r.json").write_text(json.dumps(with_images))
  cfg = dict(_config(corpus, tmp_path / "r.json", batch_size=2, num_epochs=None),
             data_files=[{"path": str(tmp_path / "r.json"), "image_folder": str(tmp_path / "nowhere")}])
  it = pipeline.make_train_iterator(cfg, tokenizer, tiny_model_config, process_index=0, process_count=1)
  with pytest.raises(records.BadInputError, match=r"4 records in a row were skipped.*missing_image=4"):
    next(it)


def test_image_cut_by_the_limit_is_dropped_with_what_follows(corpus, tokenizer, tiny_model_config, tmp_path):
  record = {"id": "two_rounds", "image": ["img0.png", "img1.jpg"],
            "conversations": [{"from": "human", "value": "<image>\nFirst?"}, {"from": "gpt", "value": "One."},
                              {"from": "human", "value": "<image>\nSecond?"}, {"from": "gpt", "value": "Two."}]}
  (tmp_path / "r.json").write_text(json.dumps([record]))
  ids, labels = tokenize.encode_conversation(record["conversations"], tokenizer, "vicuna_v1")
  second = np.flatnonzero(ids == IMAGE_TOKEN_INDEX)[1]
  start = second + (N - 1)  # expanded start of the second image: one image before it
  for max_length in (start + 1, start + N - 1, start + N):  # the image cut (twice), then fitting exactly
    _, (batch,) = _batches(corpus, tokenizer, tiny_model_config, tmp_path / "r.json", batch_size=1,
                           max_length=int(max_length), length_buckets=None)
    kept = 2 if max_length >= start + N else 1
    assert batch["num_images"][0] == kept and batch["image_valid"].sum() == kept
    assert batch["num_tokens"][0] == (start + N if kept == 2 else start)
    _check_batch(batch, corpus, tokenizer, [record], int(max_length),
                 pipeline.length_buckets(pipeline.make_data_config(_config(corpus, max_length=int(max_length),
                                                                           length_buckets=None))))


def test_skip_counts_each_reason_and_logs_ids(corpus, tokenizer, tiny_model_config, caplog):
  with caplog.at_level(logging.WARNING):
    it, batches = _batches(corpus, tokenizer, tiny_model_config, corpus["bad_jsonl"], max_length=96,
                           drop_remainder=False)
  expected = {reason: len(lines) for reason, lines in corpus["bad"].items()}
  assert dict(it.skip_stats.counts) == expected
  assert set(expected) == set(records.REASONS)  # the corpus holds every reason
  for reason, lines in corpus["bad"].items():
    for line in lines:
      rid = line["id"] if isinstance(line, dict) else f"{corpus['bad_jsonl']}:"
      assert any(rid in m and reason in m for m in caplog.messages), (rid, reason)
  assert it.summary() in caplog.text  # printed at the end
  assert it.summary().startswith(f"bad input: skipped {sum(expected.values())} record(s): malformed_json=1,")
  good = [i for i, x in enumerate(corpus["mixed"]) if isinstance(x, dict) and x in corpus["clean"]]
  assert sorted(i for b in batches for i in b["record_index"] if i >= 0) == good  # every good one, once
  for batch in batches:
    _check_batch(batch, corpus, tokenizer, corpus["mixed"], 96)


@pytest.mark.parametrize("reason", records.REASONS)
def test_strict_raises_naming_record_and_reason(corpus, tokenizer, tiny_model_config, reason):
  path = corpus["single"] / f"{reason}.jsonl"
  first = corpus["bad"][reason][0]
  rid = first["id"] if isinstance(first, dict) else f"{path}:2"
  it = pipeline.make_train_iterator(_config(corpus, path, batch_size=1, bad_input="strict"), tokenizer,
                                    tiny_model_config, process_index=0, process_count=1)
  next(it)  # the good record
  with pytest.raises(records.BadInputError, match=f"'{rid}': {reason}"):
    next(it)


def test_buckets_and_text_only_batches(corpus, tokenizer, tiny_model_config, tmp_path):
  text_only = [r for r in corpus["clean"] if "image" not in r]
  (tmp_path / "text.json").write_text(json.dumps(text_only))
  _, batches = _batches(corpus, tokenizer, tiny_model_config, tmp_path / "text.json", batch_size=2)
  for batch in batches:
    assert batch["images"].shape == (0, 28, 28, 3) and batch["image_valid"].shape == (0,)
    _check_batch(batch, corpus, tokenizer, text_only, 96)
  # Image buckets: counts round up to a bucket, beyond the last to a multiple of it.
  assert pipeline.image_buckets(pipeline.make_data_config(_config(corpus, batch_size=8))) == (0, 2, 4, 8)
  assert [pipeline.round_up(n, (0, 2, 4)) for n in (0, 1, 3, 4, 5, 9)] == [0, 2, 4, 4, 8, 12]
  with pytest.raises(ValueError, match="length_buckets"):
    pipeline.length_buckets(pipeline.make_data_config(_config(corpus, length_buckets=(128,))))


def test_image_buckets_shape(corpus, tokenizer, tiny_model_config):
  _, batches = _batches(corpus, tokenizer, tiny_model_config, image_buckets=(0, 3), batch_size=4)
  for batch in batches:
    n = batch["image_valid"].sum()
    assert batch["images"].shape[0] == (0 if n == 0 else 3 if n <= 3 else -(-n // 3) * 3)


def test_drop_or_pad_the_last_batch(corpus, tokenizer, tiny_model_config):
  _, dropped = _batches(corpus, tokenizer, tiny_model_config, batch_size=5)
  _, padded = _batches(corpus, tokenizer, tiny_model_config, batch_size=5, drop_remainder=False)
  assert len(dropped) == 2 and len(padded) == 3
  assert padded[-1]["row_valid"].tolist() == [True, True, False, False, False]
  assert (padded[-1]["labels"][2:] == IGNORE_INDEX).all()
  _check_batch(padded[-1], corpus, tokenizer, corpus["clean"], 96)


def _order(batches):
  return [int(i) for b in batches for i in b["record_index"] if i >= 0]


def test_shuffle_by_seed_and_epoch(corpus, tokenizer, tiny_model_config):
  kw = dict(shuffle=True, num_epochs=3, batch_size=2, max_length=64, length_buckets=(64,))
  _, a = _batches(corpus, tokenizer, tiny_model_config, seed=1, **kw)
  _, b = _batches(corpus, tokenizer, tiny_model_config, seed=1, **kw)
  _, c = _batches(corpus, tokenizer, tiny_model_config, seed=2, **kw)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  n = len(corpus["clean"])
  epochs = [_order(a)[e * n:(e + 1) * n] for e in range(3)]
  assert all(sorted(e) == list(range(n)) for e in epochs)  # each epoch is a permutation
  assert len({tuple(e) for e in epochs}) == 3  # a new order each epoch
  assert _order(c) != _order(a)
  assert epochs[0] != list(range(n))


def test_sharding_disjoint_and_covering(corpus, tokenizer, tiny_model_config):
  kw = dict(shuffle=True, seed=3, batch_size=2, max_length=64, length_buckets=(64,), num_epochs=2)
  n = len(corpus["clean"])
  shards = [_order(_batches(corpus, tokenizer, tiny_model_config, pi=p, pc=2, **kw)[1]) for p in range(2)]
  assert len(shards[0]) == len(shards[1]) == n  # n/2 per epoch each
  for e in range(2):
    mine = [s[e * n // 2:(e + 1) * n // 2] for s in shards]
    assert not set(mine[0]) & set(mine[1]) and sorted(mine[0] + mine[1]) == list(range(n))
  # Three processes, 12 records: 4 each. Five processes: 2 each, two records of each epoch left out.
  five = [_order(_batches(corpus, tokenizer, tiny_model_config, pi=p, pc=5, **dict(kw, num_epochs=1))[1])
          for p in range(5)]
  assert all(len(s) == 2 for s in five) and len(set(sum(five, []))) == 10


def test_eval_covers_every_record_once_with_equal_batch_counts(corpus, tokenizer, tiny_model_config):
  kw = dict(batch_size=2, max_length=96, shuffle=True, num_epochs=5)  # eval: no shuffle, one pass
  shards = [_batches(corpus, tokenizer, tiny_model_config, corpus["bad_jsonl"], pi=p, pc=3, eval_=True, **kw)
            for p in range(3)]
  per_process = math.ceil(len(corpus["mixed"]) / 3)
  assert [len(b) for _, b in shards] == [math.ceil(per_process / 2)] * 3
  orders = [_order(b) for _, b in shards]
  good = [i for i, x in enumerate(corpus["mixed"]) if isinstance(x, dict) and x in corpus["clean"]]
  assert sorted(sum(orders, [])) == good
  for p in range(3):
    assert orders[p] == [i for i in good if i % 3 == p]  # in file order
  assert sum(it.skip_stats.total for it, _ in shards) == sum(len(v) for v in corpus["bad"].values())
  for _, batches in shards:
    for batch in batches:
      _check_batch(batch, corpus, tokenizer, corpus["mixed"], 96)


def test_group_by_modality_length_order():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 100, size=50)
  has_image = rng.random(50) < 0.6
  order = pipeline.modality_grouped_order(np.arange(50), lengths, has_image, 8, np.random.default_rng(1))
  assert sorted(order) == list(range(50))
  full = (has_image.sum() // 8 + (~has_image).sum() // 8) * 8
  for start in range(0, full, 8):
    mb = order[start:start + 8]
    assert len(set(has_image[mb])) == 1  # one modality per megabatch
    assert list(lengths[mb]) == sorted(lengths[mb], reverse=True)  # longest first
  tail = order[full:]
  assert list(lengths[tail]) == sorted(lengths[tail], reverse=True)
  assert len(tail) == has_image.sum() % 8 + (~has_image).sum() % 8


def test_group_by_modality_length_pipeline(corpus, tokenizer, tiny_model_config):
  """Two processes of batch 2: each global megabatch of 4 is of one modality (only the last one mixes)."""
  kw = dict(shuffle=True, group_by_modality_length=True, batch_size=2, seed=5, max_length=96)
  rows = [_batches(corpus, tokenizer, tiny_model_config, pi=p, pc=2, **kw)[1] for p in range(2)]
  has_image = ["image" in r for r in corpus["clean"]]  # 8 with images, 4 text-only: 3 megabatches, no leftovers
  for b0, b1 in zip(*rows):
    step = list(b0["record_index"]) + list(b1["record_index"])
    assert len({has_image[i] for i in step}) == 1
  assert sorted(_order(rows[0]) + _order(rows[1])) == list(range(len(corpus["clean"])))


def _assert_same(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_resume_gives_the_same_batches(corpus, tokenizer, tiny_model_config, tmp_path):
  cfg = _config(corpus, corpus["bad_jsonl"], shuffle=True, seed=7, num_epochs=3, batch_size=2)
  uninterrupted = pipeline.make_train_iterator(cfg, tokenizer, tiny_model_config, process_index=0, process_count=1)
  full = list(uninterrupted)
  it = pipeline.make_train_iterator(cfg, tokenizer, tiny_model_config, process_index=0, process_count=1)
  head = [next(it) for _ in range(7)]  # into the second epoch
  state = json.loads(json.dumps(it.get_state()))
  counts = dict(it.skip_stats.counts)
  assert counts  # some skips happened before the checkpoint
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(7, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    resumed = pipeline.make_train_iterator(cfg, tokenizer, tiny_model_config, process_index=0, process_count=1)
    manager.restore(7, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointRestore(resumed)))
  assert dict(resumed.skip_stats.counts) == counts
  _assert_same(head + list(resumed), full)
  again = pipeline.make_train_iterator(cfg, tokenizer, tiny_model_config, process_index=0, process_count=1)
  again.set_state(state)
  _assert_same(head + list(again), full)
  assert again.skip_stats.counts == resumed.skip_stats.counts == uninterrupted.skip_stats.counts


def test_two_workers_give_the_same_batches(corpus, tokenizer, tiny_model_config):
  """grain worker processes (spawn) change nothing: same batches, same counts, and resume works across them."""
  cfg = _config(corpus, corpus["bad_jsonl"], shuffle=True, seed=11, num_epochs=2, batch_size=2)
  it0 = pipeline.make_train_iterator(cfg, tokenizer, tiny_model_config, process_index=0, process_count=1)
  serial = list(it0)
  it2 = pipeline.make_train_iterator(dict(cfg, worker_count=2), tokenizer, tiny_model_config, process_index=0,
                                     process_count=1)
  try:
    head = [next(it2) for _ in range(3)]
    state = it2.get_state()
    parallel = head + list(it2)
  finally:
    it2.close()
  _assert_same(parallel, serial)
  assert it2.skip_stats.counts == it0.skip_stats.counts
  resumed = pipeline.make_train_iterator(dict(cfg, worker_count=2), tokenizer, tiny_model_config,
                                         process_index=0, process_count=1)
  try:
    resumed.set_state(state)
    _assert_same(head + list(resumed), serial)
  finally:
    resumed.close()


def test_config_forms(corpus, tokenizer, tiny_model_config):
  cd = ml_collections.ConfigDict(_config(corpus, batch_size=3))
  a = pipeline.make_data_config(cd)
  b = pipeline.make_data_config(None, **_config(corpus, batch_size=3))
  assert a == b and a.batch_size == 3 and a.length_buckets == (32, 64)
  with pytest.raises(ValueError, match="unknown data config fields.*batchsize"):
    pipeline.make_data_config(cd, batchsize=4)
  with pytest.raises(ValueError, match="bad_input"):
    pipeline.make_data_config(cd, bad_input="ignore")
  it = pipeline.make_train_iterator(cd, tokenizer, tiny_model_config, process_index=0, process_count=1)
  assert next(it)["input_ids"].shape[0] == 3
  for bad, match in (({"template": "vicuna_v9"}, "unknown conversation template"), ({"aspect": "crop"}, "aspect")):
    with pytest.raises(ValueError, match=match):  # at construction, not in a worker
      pipeline.make_train_iterator(cd, tokenizer, tiny_model_config, process_index=0, process_count=1, **bad)
  with pytest.raises(ValueError, match="cannot be shared by 20 processes"):
    pipeline.make_train_iterator(cd, tokenizer, tiny_model_config, process_index=0, process_count=20)


def test_num_epochs_none_repeats(corpus, tokenizer, tiny_model_config):
  kw = dict(shuffle=True, seed=9, batch_size=3, max_length=64, length_buckets=(64,))
  _, two = _batches(corpus, tokenizer, tiny_model_config, num_epochs=2, **kw)
  it = pipeline.make_train_iterator(_config(corpus, num_epochs=None, **kw), tokenizer, tiny_model_config,
                                    process_index=0, process_count=1)
  _assert_same([next(it) for _ in range(len(two) + 4)][:len(two)], two)


def test_batches_fit_the_model_splice(corpus, tokenizer, tiny_model_config):
  """The model's `splice` turns each batch into exactly LLaVA's expanded rows, images in placeholder order."""
  import jax.numpy as jnp
  from llava_jax.models import llava
  _, batches = _batches(corpus, tokenizer, tiny_model_config, corpus["bad_jsonl"], drop_remainder=False)
  dim = 5
  for batch in batches:
    b, length = batch["input_ids"].shape
    text = np.random.default_rng(0).normal(size=(b, length, dim)).astype(np.float32)
    count = batch["images"].shape[0]
    # Image k's features: its index in every entry, so the positions show which image landed there.
    feats = np.broadcast_to(np.arange(count, dtype=np.float32)[:, None, None] + 1000, (count, N, dim))
    out = llava.splice(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]), jnp.asarray(text),
                       jnp.asarray(feats) if count else None, jnp.asarray(batch["labels"]))
    image = 0
    for r in range(b):
      n_tok = batch["num_tokens"][r]
      assert np.asarray(out.mask[r]).sum() == n_tok
      t = batch["attention_mask"][r].sum()
      expected = _expand(batch["input_ids"][r, :t], batch["labels"][r, :t])
      np.testing.assert_array_equal(np.asarray(out.labels[r, :n_tok]), expected)
      where = np.flatnonzero(np.repeat(batch["input_ids"][r, :t] == IMAGE_TOKEN_INDEX,
                                       np.where(batch["input_ids"][r, :t] == IMAGE_TOKEN_INDEX, N, 1)))
      got = np.asarray(out.embeds[r, where, 0]).reshape(-1, N)
      want = np.repeat(np.arange(image, image + batch["num_images"][r]) + 1000.0, N).reshape(-1, N)
      np.testing.assert_array_equal(got, want)
      image += batch["num_images"][r]


def test_read_threads_change_nothing(corpus, tokenizer, tiny_model_config):
  kw = dict(shuffle=True, seed=2, batch_size=3, num_epochs=2)
  _, one = _batches(corpus, tokenizer, tiny_model_config, corpus["bad_jsonl"], read_threads=1, **kw)
  _, four = _batches(corpus, tokenizer, tiny_model_config, corpus["bad_jsonl"], read_threads=4, **kw)
  _assert_same(four, one)
