"""grain input pipeline: LLaVA records -> static-shape training batches.

    records (JSON/JSONL/TFDS, weighted mixture)
      -> per-epoch order (global shuffle by seed and epoch, or LLaVA's modality/length grouping)
      -> this process's shard (every process_count-th element of the global order)
      -> [grain workers] parse, load + preprocess images, encode the conversation, truncate after expansion
      -> [main process] apply the bad-input policy (exact counts), pack rows into a batch of static shapes.

Config fields (an ml_collections ConfigDict, a dict, or keyword arguments; `DataConfig`):
  data_files: a path, a {path, image_folder, weight} dict, or a list of them (see `records.DataFile`).
  template: conversation template name (default: model_config.template).
  max_length: positions after image expansion (each image takes model_config.image_seq_length positions).
  length_buckets: allowed batch lengths L, ascending, each <= max_length; max_length is always the last
    (default: max_length/4, max_length/2, max_length).
  image_size, aspect, image_mean, image_std: image preprocessing (default: from model_config).
  batch_size: rows per batch in this process (B).
  image_buckets: allowed image counts I per batch, ascending (default: 0, B/4, B/2, B); a batch with more
    images than the last bucket rounds up to a multiple of it.
  seed, shuffle, num_epochs (None: repeat forever), group_by_modality_length: the order (training).
  drop_remainder: training drops the last partial batch of the run if True, else pads it.
  bad_input: 'skip' (count, log, summary) or 'strict' (raise `records.BadInputError`).
  move_image_to_front: LLaVA's preprocess_multimodal ('<image>\\n' first in its turn).
  worker_count: grain worker processes (0: in this process); worker_buffer_size, read_threads.

A batch (numpy dict; B, L, I static per bucket, S = image_size):
  input_ids int32[B, L]: collapsed ids (one IMAGE_TOKEN_INDEX per image), right-padded with the pad id
    (tokenizer.pad_token_id, or 0 = <unk> like LLaVA when it has none).
  labels int32[B, L]: aligned with input_ids (not shifted); IGNORE_INDEX at placeholders, masked tokens, padding.
  attention_mask int32[B, L]: 1 on real tokens (placeholders included), 0 on padding.
  images float32[I, S, S, 3]: the batch's images in row-major placeholder order, then zeros.
  image_valid bool[I]: True for real images (as many as placeholders in input_ids).
  num_images int32[B]: images of each row.
  num_tokens int32[B]: positions each row takes after expansion (<= L: every row's expanded sequence fits L).
  row_valid bool[B]: False for padding rows (all labels IGNORE_INDEX, attention 0).
  record_index int32[B]: the row's record (position in the concatenated data files; -1 for padding), for
    debugging and tests; the model ignores it.
Padding rows appear only in the last batch (drop_remainder=False) and in eval batches (see `make_eval_iterator`).

Truncation follows LLaVA (to max_length after expansion) with one difference: an image that would be cut by the
limit is dropped whole with everything after it (LLaVA keeps its first features, which carry no label and are
followed by nothing, so the loss is the same). A sample left without a supervised label is skipped as
'too_long' ('no_labels' if it had none to begin with) -- never trained on with loss 0.

Resuming: the iterator's `get_state()/set_state()` (JSON-able; orbax via `grain.checkpoint.CheckpointSave`)
restore the exact position and the skip counts.

Workers: grain starts them with 'spawn', so a script that sets worker_count > 0 needs the
`if __name__ == '__main__':` guard, and the records, the tokenizer and the transform are pickled to each worker.
Samples cross to the main process as float32 images; the batch is assembled there (a copy per batch).
Every process reads every data file's text (JSON path); at pod scale prefer the TFDS folders (`tfds_llava`),
which are read by random access.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

from absl import logging
import grain
import numpy as np

from llava_jax.data import images
from llava_jax.data import records
from llava_jax.data import templates
from llava_jax.data import tokenize
from llava_jax.models.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Input pipeline settings (see the module docstring)."""
  data_files: Any = None
  template: str | None = None
  max_length: int = 2048
  length_buckets: tuple[int, ...] | None = None
  image_size: int | None = None
  aspect: str | None = None
  image_mean: tuple[float, ...] | None = None
  image_std: tuple[float, ...] | None = None
  batch_size: int = 16
  image_buckets: tuple[int, ...] | None = None
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = 1
  group_by_modality_length: bool = False
  drop_remainder: bool = True
  bad_input: str = "skip"
  move_image_to_front: bool = True
  worker_count: int = 0
  worker_buffer_size: int = 2
  read_threads: int = 2


def make_data_config(config: Any = None, **overrides) -> DataConfig:
  """A `DataConfig` from a ConfigDict / dict / DataConfig / None, updated with keyword overrides."""
  if config is None:
    fields = {}
  elif isinstance(config, DataConfig):
    fields = dataclasses.asdict(config)
  elif hasattr(config, "to_dict"):
    fields = config.to_dict()
  else:
    fields = dict(config)
  fields.update(overrides)
  known = {f.name for f in dataclasses.fields(DataConfig)}
  unknown = set(fields) - known
  if unknown:
    raise ValueError(f"unknown data config fields: {sorted(unknown)}; known: {sorted(known)}")
  for key in ("length_buckets", "image_buckets", "image_mean", "image_std"):
    if fields.get(key) is not None:
      fields[key] = tuple(fields[key])
  cfg = DataConfig(**fields)
  if cfg.data_files is None:
    raise ValueError("data config needs data_files")
  if cfg.batch_size < 1 or cfg.max_length < 1:
    raise ValueError(f"batch_size and max_length must be positive, got {cfg.batch_size}, {cfg.max_length}")
  if cfg.bad_input not in records.POLICIES:
    raise ValueError(f"bad_input must be one of {records.POLICIES}, got {cfg.bad_input!r}")
  return cfg


def length_buckets(cfg: DataConfig) -> tuple[int, ...]:
  """The allowed batch lengths, ascending, ending with max_length."""
  buckets = cfg.length_buckets or (max(cfg.max_length // 4, 1), max(cfg.max_length // 2, 1))
  if any(b > cfg.max_length or b < 1 for b in buckets):
    raise ValueError(f"length_buckets {buckets} must lie in [1, max_length={cfg.max_length}]")
  return tuple(sorted(set(buckets) | {cfg.max_length}))


def image_buckets(cfg: DataConfig) -> tuple[int, ...]:
  """The allowed image counts per batch, ascending."""
  b = cfg.batch_size
  buckets = cfg.image_buckets if cfg.image_buckets is not None else (0, -(-b // 4), -(-b // 2), b)
  if not buckets or any(n < 0 for n in buckets):
    raise ValueError(f"image_buckets {buckets} must be counts >= 0")
  return tuple(sorted(set(buckets)))


def round_up(n: int, buckets: tuple[int, ...]) -> int:
  """The smallest of the ascending `buckets` >= n; beyond the last, a multiple of it."""
  for b in buckets:
    if b >= n:
      return b
  top = buckets[-1]
  if top == 0:
    raise ValueError(f"a batch has {n} images but image_buckets is {buckets}")
  return -(-n // top) * top


# ----------------------------------------------------------------------------------------------------------------
# Order and sharding.


def modality_grouped_order(indices: np.ndarray, lengths: np.ndarray, has_image: np.ndarray, megabatch: int,
                           rng: np.random.Generator) -> np.ndarray:
  """LLaVA's group_by_modality_length: int64[M] a permutation of `indices`.

  Per modality (with / without image) the records are shuffled and cut into megabatches of `megabatch`
  (the global batch), each sorted by length, longest first; the megabatches are shuffled together and the
  leftovers of both modalities make one last mixed megabatch.
  """
  groups, leftovers = [], []
  for mask in (has_image[indices], ~has_image[indices]):
    members = rng.permutation(indices[mask])
    full = len(members) // megabatch * megabatch
    for start in range(0, full, megabatch):
      mb = members[start:start + megabatch]
      groups.append(mb[np.argsort(-lengths[mb], kind="stable")])
    leftovers.append(members[full:])
  groups = [groups[i] for i in rng.permutation(len(groups))]
  tail = np.concatenate(leftovers)
  groups.append(tail[np.argsort(-lengths[tail], kind="stable")])
  return np.concatenate(groups).astype(np.int64)


class EpochOrderSource:
  """Random-access source of this process's records over epochs (grain `RandomAccessDataSource`).

  Epoch e uses rng([seed, e]): the mixture's weighted draw, then a shuffle / modality grouping over all
  processes' records; process p takes positions p, p+P, ... of that global order. Training: every process
  gets floor(M/P) records per epoch (at most P-1 records of an epoch, different ones each epoch, are left out so
  all processes take equal steps). Eval (`pad_shards`): ceil(M/P) per process, the missing ones are padding.
  """

  def __init__(self, mixture: records.MixtureSource, *, seed: int, shuffle: bool, group: bool, batch_size: int,
               num_epochs: int | None, process_index: int, process_count: int, pad_shards: bool = False):
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    self._mixture = mixture
    self._seed, self._shuffle, self._group = seed, shuffle, group
    self._megabatch = batch_size * process_count
    self._p, self._pcount, self._pad = process_index, process_count, pad_shards
    total = len(mixture.epoch_indices(np.random.default_rng([seed, 0])))
    self.per_epoch = -(-total // process_count) if pad_shards else total // process_count
    if self.per_epoch == 0:
      raise ValueError(f"{total} record(s) per epoch cannot be shared by {process_count} processes")
    epochs = num_epochs if num_epochs is not None else sys.maxsize // (2 * self.per_epoch)
    self._len = self.per_epoch * epochs
    self._cache = {}  # epoch -> order, the last two; replaced whole, as reader threads share it

  def __len__(self) -> int:
    return self._len

  def epoch_order(self, epoch: int) -> np.ndarray:
    """int64[per_epoch]: global record indices this process reads in `epoch` (-1: padding)."""
    cache = self._cache
    if epoch in cache:
      return cache[epoch]
    rng = np.random.default_rng([self._seed, epoch])
    idx = self._mixture.epoch_indices(rng)
    if self._group:
      idx = modality_grouped_order(idx, self._mixture.lengths, self._mixture.has_image, self._megabatch, rng)
    elif self._shuffle:
      idx = rng.permutation(idx)
    mine = idx[self._p::self._pcount][:self.per_epoch]
    order = np.pad(mine, (0, self.per_epoch - len(mine)), constant_values=-1)
    self._cache = {**{e: o for e, o in cache.items() if e == epoch - 1}, epoch: order}
    return order

  def __getitem__(self, i: int) -> dict[str, Any]:
    epoch, k = divmod(int(i), self.per_epoch)
    j = int(self.epoch_order(epoch)[k])
    if j < 0:
      return {"padding": True}
    return dict(self._mixture[j], index=j, epoch=epoch, padding=False)


# ----------------------------------------------------------------------------------------------------------------
# Per-sample transform (runs in the grain workers).


def truncate_expanded(input_ids: np.ndarray, labels: np.ndarray, image_seq_length: int, max_length: int):
  """Keeps the longest prefix whose expansion fits max_length: (input_ids, labels, kept images, length)."""
  width = np.where(input_ids == IMAGE_TOKEN_INDEX, image_seq_length, 1)
  ends = np.cumsum(width)
  keep = int(np.searchsorted(ends, max_length, side="right"))
  return (input_ids[:keep], labels[:keep], int(np.sum(input_ids[:keep] == IMAGE_TOKEN_INDEX)),
          int(ends[keep - 1]) if keep else 0)


class SampleTransform:
  """Record element -> sample dict (picklable; the tokenizer travels to the workers).

  Output: {'id', 'source', 'index', 'skip_reason' ('' if usable), 'skip_detail', 'input_ids' int32[T],
  'labels' int32[T], 'images' float32[n, S, S, 3], 'num_tokens' (expanded length), 'padding',
  'labels_cut' (supervised tokens lost to truncation)}.
  """

  def __init__(self, tokenizer, *, template: str, image_seq_length: int, max_length: int, image_size: int,
               aspect: str, image_mean, image_std, move_image_to_front: bool = True):
    self.tokenizer = tokenizer
    self.template_name = template
    self.image_seq_length, self.max_length = image_seq_length, max_length
    self.image_size, self.aspect = image_size, aspect
    self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
    self.move_image_to_front = move_image_to_front
    self._template = None

  def __getstate__(self):
    return dict(self.__dict__, _template=None)

  def _empty(self, **kw) -> dict[str, Any]:
    out = {"id": "", "source": "", "index": -1, "skip_reason": "", "skip_detail": "", "padding": False,
           "num_tokens": 0, "labels_cut": 0, "input_ids": np.zeros([0], np.int32), "labels": np.zeros([0], np.int32),
           "images": np.zeros([0, self.image_size, self.image_size, 3], np.float32)}
    out.update(kw)
    return out

  def _load_images(self, parsed: records.ParsedRecord, element: dict[str, Any]) -> list[Any]:
    loaded = []
    data = element.get("image_data")
    for k, name in enumerate(parsed.images):
      if data is not None:  # TFDS: bytes stored at conversion, None where the file was missing then.
        if data[k] is None:
          raise records.BadRecord("missing_image", f"{element['source']}: image {name!r} was missing at conversion")
        what = data[k]
      else:
        what = os.path.join(element["image_folder"], name)
        if not os.path.isfile(what):
          raise records.BadRecord("missing_image", f"{element['source']}: image file {what} does not exist")
      try:
        loaded.append(images.load_image(what))
      except images.ImageError as e:
        raise records.BadRecord("bad_image", f"{element['source']}: image {name!r}: {e}") from None
    return loaded

  def __call__(self, element: dict[str, Any]) -> dict[str, Any]:
    if element.get("padding"):
      return self._empty(padding=True)
    source, index = element["source"], element["index"]
    try:
      parsed = records.parse_record(element["text"], source)
    except records.BadRecord as e:
      return self._empty(id=records.record_id(element["text"], source), source=source, index=index,
                         skip_reason=e.reason, skip_detail=e.detail)
    try:
      return self._encode(parsed, element)
    except records.BadRecord as e:
      return self._empty(id=parsed.id, source=source, index=index, skip_reason=e.reason, skip_detail=e.detail)

  def _encode(self, parsed: records.ParsedRecord, element: dict[str, Any]) -> dict[str, Any]:
    source = element["source"]
    pil_images = self._load_images(parsed, element)
    if self._template is None:
      self._template = templates.get_template(self.template_name)
    try:
      input_ids, labels = tokenize.encode_conversation(parsed.conversations, self.tokenizer, self._template,
                                                       move_image_to_front=self.move_image_to_front)
    except ValueError as e:
      raise records.BadRecord("malformed_record", f"{source}: {e}") from None
    input_ids, labels = np.asarray(input_ids, np.int32), np.asarray(labels, np.int32)
    placeholders = int(np.sum(input_ids == IMAGE_TOKEN_INDEX))
    if placeholders != len(pil_images):
      raise records.BadRecord("image_tag_mismatch",
                              f"{source}: the encoded prompt has {placeholders} image placeholder(s) for "
                              f"{len(pil_images)} image(s)")
    supervised = int(np.sum(labels != IGNORE_INDEX))
    if not supervised:
      raise records.BadRecord("no_labels", f"{source}: no supervised token (no assistant reply?)")
    input_ids, labels, kept, num_tokens = truncate_expanded(input_ids, labels, self.image_seq_length,
                                                            self.max_length)
    labels_cut = supervised - int(np.sum(labels != IGNORE_INDEX))
    if labels_cut == supervised:
      raise records.BadRecord("too_long", f"{source}: no supervised token left after truncation to "
                              f"{self.max_length} positions (images take {self.image_seq_length} each)")
    pixels = []
    for name, img in zip(parsed.images, pil_images[:kept]):
      try:
        pixels.append(images.preprocess_image(img, image_size=self.image_size, aspect=self.aspect,
                                              mean=self.image_mean, std=self.image_std))
      except ValueError as e:  # e.g. an empty image; the settings were checked in make_dataset
        raise records.BadRecord("bad_image", f"{source}: image {name!r}: {e}") from None
    pixels = (np.stack(pixels).astype(np.float32) if pixels
              else np.zeros([0, self.image_size, self.image_size, 3], np.float32))
    return self._empty(id=parsed.id, source=source, index=element["index"], input_ids=input_ids, labels=labels,
                       images=pixels, num_tokens=num_tokens, labels_cut=labels_cut)


# ----------------------------------------------------------------------------------------------------------------
# Batching and the bad-input policy (main process).


def collate(rows: list[dict[str, Any]], *, batch_size: int, length_buckets: tuple[int, ...],
            image_buckets: tuple[int, ...], pad_id: int, image_size: int) -> dict[str, np.ndarray]:
  """Samples (and padding markers) -> a batch of static shapes (see the module docstring)."""
  if len(rows) > batch_size:
    raise ValueError(f"{len(rows)} rows for a batch of {batch_size}")
  real = [r for r in rows if not r["padding"] and not r["skip_reason"]]
  longest = max([r["num_tokens"] for r in real], default=0)
  length = round_up(longest, length_buckets)
  num_images = sum(len(r["images"]) for r in real)
  count = round_up(num_images, image_buckets)
  batch = {
      "input_ids": np.full([batch_size, length], pad_id, np.int32),
      "labels": np.full([batch_size, length], IGNORE_INDEX, np.int32),
      "attention_mask": np.zeros([batch_size, length], np.int32),
      "images": np.zeros([count, image_size, image_size, 3], np.float32),
      "image_valid": np.zeros([count], bool),
      "num_images": np.zeros([batch_size], np.int32),
      "num_tokens": np.zeros([batch_size], np.int32),
      "row_valid": np.zeros([batch_size], bool),
      "record_index": np.full([batch_size], -1, np.int32),
  }
  k = 0
  for b, r in enumerate(rows):
    if r["padding"] or r["skip_reason"]:
      continue
    t = len(r["input_ids"])
    batch["input_ids"][b, :t] = r["input_ids"]
    batch["labels"][b, :t] = r["labels"]
    batch["attention_mask"][b, :t] = 1
    n = len(r["images"])
    batch["images"][k:k + n] = r["images"]
    batch["image_valid"][k:k + n] = True
    k += n
    batch["num_images"][b] = n
    batch["num_tokens"][b] = r["num_tokens"]
    batch["row_valid"][b] = True
    batch["record_index"][b] = r["index"]
  return batch


class BatchIterator(grain.DatasetIterator):
  """Applies the bad-input policy to samples and yields static-shape batches; checkpointable.

  `skip_stats` holds the counts of skipped records by reason and of truncated ones; `summary()` says them.
  Training (`keep_positions` False) fills a skipped record's row with the next record, so each process's place
  in the global order runs ahead by its own skip count (the trainer's iterator has no end, so every process
  still takes the same steps). More than `max_skips_in_a_row` skips in a row (a whole epoch of this process's
  records, e.g. a wrong image folder) raise `BadInputError` instead of searching on forever.
  """

  def __init__(self, parent: grain.DatasetIterator, *, policy: str, keep_positions: bool, drop_remainder: bool,
               collate_kw: dict[str, Any], max_length: int, max_skips_in_a_row: int | None = None):
    super().__init__(parent)
    self.skip_stats = records.SkipStats(policy)
    self._keep_positions, self._drop_remainder = keep_positions, drop_remainder
    self._collate_kw, self._max_length = collate_kw, max_length
    self._max_skips_in_a_row, self._skips_in_a_row = max_skips_in_a_row, 0
    self._done = False

  def summary(self) -> str:
    return self.skip_stats.summary()

  def __next__(self) -> dict[str, np.ndarray]:
    rows = []
    batch_size = self._collate_kw["batch_size"]
    while len(rows) < batch_size:
      try:
        sample = next(self._parent)
      except StopIteration:
        if not self._done:
          self._done = True
          logging.log(logging.WARNING if self.skip_stats.total else logging.INFO, "end of data: %s", self.summary())
        if rows and not self._drop_remainder:
          break
        raise
      if sample["skip_reason"]:
        self.skip_stats.add(sample["id"], sample["skip_reason"], sample["skip_detail"])
        self._skips_in_a_row += 1
        if self._max_skips_in_a_row is not None and self._skips_in_a_row > self._max_skips_in_a_row:
          raise records.BadInputError(
              f"{self._skips_in_a_row} records in a row were skipped, more than one epoch of this process's "
              f"{self._max_skips_in_a_row}: no usable training data ({self.summary()}; check the image folder "
              "and the data files)")
        if not self._keep_positions:
          continue
      else:
        self._skips_in_a_row = 0
        if sample["labels_cut"]:
          self.skip_stats.add_truncated(sample["id"], int(sample["labels_cut"]), self._max_length)
      rows.append(sample)
    return collate(rows, **self._collate_kw)

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), "skipped": self.skip_stats.state(),
            "skips_in_a_row": self._skips_in_a_row}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self.skip_stats.set_state(state["skipped"])
    self._skips_in_a_row = int(state.get("skips_in_a_row", 0))  # absent in states written before it
    self._done = False


class BatchIterDataset(grain.IterDataset):
  """grain IterDataset of static-shape batches (iterating it gives a `BatchIterator`)."""

  def __init__(self, parent: grain.IterDataset, **kw):
    super().__init__(parent)
    self._kw = kw

  def __iter__(self) -> BatchIterator:
    return BatchIterator(self._parent.__iter__(), **self._kw)


def make_dataset(config: Any, tokenizer, model_config, *, train: bool = True, process_index: int | None = None,
                 process_count: int | None = None, **overrides) -> BatchIterDataset:
  """The batch dataset: training (shuffled/grouped, num_epochs) or eval (in order, one pass, padded shards)."""
  cfg = make_data_config(config, **overrides)
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  mixture = records.MixtureSource.from_files(cfg.data_files)
  order = EpochOrderSource(
      mixture, seed=cfg.seed, shuffle=cfg.shuffle and train, group=cfg.group_by_modality_length and train,
      batch_size=cfg.batch_size, num_epochs=cfg.num_epochs if train else 1, process_index=process_index,
      process_count=process_count, pad_shards=not train)
  image_size = cfg.image_size or model_config.vision.image_size
  aspect = cfg.aspect or model_config.image_aspect_ratio
  if aspect not in ("square", "pad"):
    raise ValueError(f"image aspect must be 'square' or 'pad', got {aspect!r}")
  template = cfg.template or model_config.template
  templates.get_template(template)  # an unknown name fails here, not in a worker
  transform = SampleTransform(
      tokenizer, template=template, image_seq_length=model_config.image_seq_length,
      max_length=cfg.max_length, image_size=image_size, aspect=aspect,
      image_mean=cfg.image_mean or model_config.image_mean, image_std=cfg.image_std or model_config.image_std,
      move_image_to_front=cfg.move_image_to_front)
  ds = grain.MapDataset.source(order).map(transform)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(cfg.read_threads, 1),
                                            prefetch_buffer_size=max(cfg.read_threads, 1) * 4))
  if cfg.worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count,
                                                     per_worker_buffer_size=cfg.worker_buffer_size))
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  return BatchIterDataset(
      ds, policy=cfg.bad_input, keep_positions=not train, drop_remainder=cfg.drop_remainder and train,
      max_length=cfg.max_length, max_skips_in_a_row=order.per_epoch if train else None,
      collate_kw=dict(batch_size=cfg.batch_size, length_buckets=length_buckets(cfg), image_buckets=image_buckets(cfg),
                      pad_id=pad_id, image_size=image_size))


def make_train_iterator(config: Any, tokenizer, model_config, *, process_index: int | None = None,
                        process_count: int | None = None, **overrides) -> BatchIterator:
  """Training batches of this process (shuffle by seed and epoch, num_epochs, drop/pad the last batch)."""
  return iter(make_dataset(config, tokenizer, model_config, train=True, process_index=process_index,
                           process_count=process_count, **overrides))


def make_eval_iterator(config: Any, tokenizer, model_config, *, process_index: int | None = None,
                       process_count: int | None = None, **overrides) -> BatchIterator:
  """Eval batches: file order, one pass, every record once over all processes.

  Process p reads records p, p+P, ...; every process yields the same number of batches (ceil(ceil(M/P)/B)):
  skipped records keep their row as a padding row (row_valid False, labels all IGNORE_INDEX), and so do the
  missing places of shorter shards and of the last batch.
  """
  return iter(make_dataset(config, tokenizer, model_config, train=False, process_index=process_index,
                           process_count=process_count, **overrides))
