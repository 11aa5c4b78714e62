"""LLaVA's data format: reading, validating and mixing conversation records, and the bad-input policy.

A data file is a JSON list or JSONL of records (LLaVA's format, `llava_v1_5_mix665k.json`):

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}

`image` is a path relative to the file's image folder, or a list of them (one `<image>` tag per image, in order);
without `image` the record is text-only. `id` is only used to name the record in logs (the record's position
`file:line` stands in when it is absent).

Records are kept as their JSON text and parsed where they are used (in the grain workers), so the main process
holds one bytes buffer per file instead of millions of Python objects, and a malformed line stays a record that
is reported like any other bad input rather than failing the whole file.

Bad input has a reason from `REASONS`. `parse_record` finds those visible in the text; the pipeline finds the
rest (`missing_image`, `bad_image` when an image is loaded; `no_labels`, `too_long` after tokenisation).
`SkipStats` applies the policy: 'skip' (count by reason, log the record id and reason, `summary()`) or
'strict' (raise `BadInputError` naming the record and the reason). A record that keeps supervised tokens after
truncation to max_length is trained on (as LLaVA does) but counted, with the supervised tokens it lost, and
logged. Nothing is silently dropped or altered.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any, Iterable, Sequence

from absl import logging
import numpy as np

from llava_jax.data import tokenize

REASONS = (
    "malformed_json",  # a JSONL line that is not JSON
    "malformed_record",  # not an object, no/odd `conversations`, a turn without string `from`/`value`, bad `image`
    "empty_conversation",  # `conversations` is an empty list
    "unknown_role",  # `from` is not human/gpt (or user/assistant)
    "turn_order",  # turns do not alternate human, gpt, human, ... starting with human
    "image_tag_mismatch",  # number of '<image>' tags != number of images
    "missing_image",  # the image file does not exist (or was missing when a TFDS dataset was written)
    "bad_image",  # the image file cannot be decoded (not an image, truncated)
    "no_labels",  # the conversation has no supervised token at all
    "too_long",  # no supervised token is left after truncation to max_length
)
POLICIES = ("skip", "strict")
# `from` values (case-insensitive) of the turns, which alternate human, assistant, ... starting with human.
# LLaVA's data uses human/gpt; user/assistant are accepted too, as `templates` does.
HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")


class BadRecord(ValueError):
  """A record that cannot be used; `reason` is one of `REASONS`."""

  def __init__(self, reason: str, detail: str):
    assert reason in REASONS, reason
    super().__init__(f"{reason}: {detail}")
    self.reason = reason
    self.detail = detail


class BadInputError(ValueError):
  """Bad input that stops a run: a bad record in 'strict' mode (named, with its reason), or training data of
  which a whole epoch's worth of records in a row was skipped (the counts by reason)."""


@dataclasses.dataclass(frozen=True)
class DataFile:
  """One member of a data mixture.

  path: a .json (list) or .jsonl file, or a folder written by `llava_jax.data.tfds_llava` (TFDS ArrayRecord).
  image_folder: the folder the records' `image` paths are relative to (JSON only; default: the file's folder).
  weight: how often each record is seen per epoch: 2.0 twice, 0.5 a random half (drawn anew each epoch).
  """
  path: str
  image_folder: str | None = None
  weight: float = 1.0


def config_data_files(value: Any, key: str = "data_files") -> list:
  """A config's data files as a list of paths / {path, image_folder, weight} dicts.

  value: a path, a dict, a list of them, or such a list as JSON text (what a command line may carry).
  key: the config key, for the error message.
  """
  if isinstance(value, str) and value.lstrip().startswith(("[", "{")):
    try:
      value = json.loads(value)
    except json.JSONDecodeError as e:
      raise ValueError(f"{key}={value!r}: neither a path nor a JSON list of {{path, image_folder, weight}} "
                       f"dicts ({e})") from e
  return list(value) if isinstance(value, (list, tuple)) else [value]


def parse_data_files(spec: Any) -> list[DataFile]:
  """Data files from a path, a {path, image_folder, weight} dict, a `DataFile`, or a list of these."""
  if isinstance(spec, (str, os.PathLike, DataFile)) or hasattr(spec, "keys"):
    spec = [spec]
  files = []
  for item in spec:
    if isinstance(item, DataFile):
      files.append(item)
    elif isinstance(item, (str, os.PathLike)):
      files.append(DataFile(path=os.fspath(item)))
    elif hasattr(item, "keys"):
      item = dict(item)
      unknown = set(item) - {"path", "image_folder", "weight"}
      if unknown or "path" not in item:
        raise ValueError(f"data file entry {item!r}: needs 'path', may have 'image_folder' and 'weight' "
                         f"(unknown: {sorted(unknown)})")
      files.append(DataFile(path=os.fspath(item["path"]),
                            image_folder=None if item.get("image_folder") is None else os.fspath(item["image_folder"]),
                            weight=float(item.get("weight", 1.0))))
    else:
      raise ValueError(f"data file entry {item!r} is not a path or a {{path, image_folder, weight}} dict")
  if not files:
    raise ValueError("no data files given")
  for f in files:
    if not (f.weight >= 0 and np.isfinite(f.weight)):
      raise ValueError(f"data file {f.path}: weight must be finite and >= 0, got {f.weight}")
  return files


@dataclasses.dataclass(frozen=True)
class ParsedRecord:
  """A valid record: its id, its turns [{from, value}], and its image paths (relative, in tag order)."""
  id: str
  conversations: list[dict[str, str]]
  images: tuple[str, ...]


def record_id(text: str, source: str) -> str:
  """The record's `id` if it can be read, else its position `source` (used to name bad records)."""
  try:
    obj = json.loads(text)
  except ValueError:
    return source
  if isinstance(obj, dict) and isinstance(obj.get("id"), (str, int)):
    return str(obj["id"])
  return source


def parse_record(text: str, source: str) -> ParsedRecord:
  """Parses and validates one record's JSON text; raises `BadRecord` (reason, detail) if it is unusable."""
  try:
    obj = json.loads(text)
  except ValueError as e:
    raise BadRecord("malformed_json", f"{source}: {e}") from None
  if not isinstance(obj, dict):
    raise BadRecord("malformed_record", f"{source}: a record must be a JSON object, got {type(obj).__name__}")
  rid = str(obj["id"]) if isinstance(obj.get("id"), (str, int)) else source
  turns = obj.get("conversations")
  if not isinstance(turns, list):
    raise BadRecord("malformed_record", f"{source}: 'conversations' must be a list, got {turns!r:.80}")
  if not turns:
    raise BadRecord("empty_conversation", f"{source}: 'conversations' is empty")
  for i, turn in enumerate(turns):
    if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
      raise BadRecord("malformed_record", f"{source}: turn {i} must be {{'from': str, 'value': str}}, "
                      f"got {turn!r:.80}")
    role = turn["from"].lower()
    if role not in HUMAN_ROLES + ASSISTANT_ROLES:
      raise BadRecord("unknown_role", f"{source}: turn {i} has role {turn['from']!r}, expected one of "
                      f"{HUMAN_ROLES + ASSISTANT_ROLES}")
    if (role in ASSISTANT_ROLES) != (i % 2 == 1):
      raise BadRecord("turn_order", f"{source}: turn {i} is from {turn['from']!r}, expected "
                      f"{('human', 'gpt')[i % 2]!r} (turns alternate human, gpt, ... starting with human)")
  image = obj.get("image")
  if image is None:
    images = ()
  elif isinstance(image, str):
    images = (image,)
  elif isinstance(image, list) and all(isinstance(x, str) for x in image):
    images = tuple(image)
  else:
    raise BadRecord("malformed_record", f"{source}: 'image' must be a path or a list of paths, got {image!r:.80}")
  num_tags = tokenize.count_image_tags(turns)
  if num_tags != len(images):
    raise BadRecord("image_tag_mismatch", f"{source}: {num_tags} '<image>' tag(s) for {len(images)} image(s)")
  return ParsedRecord(id=rid, conversations=turns, images=images)


def estimate_length(record: Any) -> tuple[int, bool]:
  """(number of whitespace-separated words of all turns, has an image): LLaVA's key for modality grouping.

  `record` is the record's JSON text or its parsed object; a malformed record counts as (0, False).
  """
  try:
    obj = json.loads(record) if isinstance(record, str) else record
    turns = obj["conversations"]
    words = sum(len(t["value"].split()) for t in turns if isinstance(t, dict) and isinstance(t.get("value"), str))
    return words, obj.get("image") is not None
  except (ValueError, TypeError, KeyError, AttributeError):
    return 0, False


def read_records(path: str) -> list[tuple[str, str, Any]]:
  """[(source, record JSON text, parsed object or None if the text is not JSON)] of a JSON list or JSONL file.

  A JSON list must parse as a whole (a broken list file raises ValueError naming it); a JSONL line that does
  not parse is kept as it is and reported as `malformed_json` where it is used. Blank JSONL lines are not records.
  """
  with open(path, "rb") as f:
    data = f.read()
  try:
    content = data.decode("utf-8-sig")  # a leading byte order mark is not content
  except UnicodeDecodeError as e:
    raise ValueError(f"{path} is not UTF-8 text: {e}") from None
  if content.lstrip().startswith("["):
    try:
      items = json.loads(content)
    except ValueError as e:
      raise ValueError(f"{path} is not a valid JSON list: {e}") from None
    return [(f"{path}[{i}]", json.dumps(item, ensure_ascii=False), item) for i, item in enumerate(items)]
  out = []
  for n, line in enumerate(content.splitlines(), 1):
    line = line.strip()
    if line:
      try:
        obj = json.loads(line)
      except ValueError:
        obj = None
      out.append((f"{path}:{n}", line, obj))
  return out


def read_record_texts(path: str) -> list[tuple[str, str]]:
  """[(source, record JSON text)] of a JSON list or JSONL file, in file order (see `read_records`)."""
  return [(source, text) for source, text, _ in read_records(path)]


class JsonSource:
  """Random access to the records of one JSON/JSONL file (picklable; one bytes buffer).

  Element i: {'source': 'file:line', 'text': the record's JSON, 'image_folder': str, 'image_data': None}.
  """

  def __init__(self, path: str, image_folder: str | None = None):
    self.path = os.fspath(path)
    self.image_folder = os.fspath(image_folder) if image_folder is not None else os.path.dirname(self.path)
    items = read_records(self.path)
    encoded = [text.encode("utf-8") for _, text, _ in items]
    self._sources = [source for source, _, _ in items]
    self._blob = b"".join(encoded)
    self._offsets = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
    est = [estimate_length(obj) for _, _, obj in items]
    self.lengths = np.array([w for w, _ in est], np.int32)  # int32[N] word counts
    self.has_image = np.array([m for _, m in est], bool)  # bool[N]

  def __len__(self) -> int:
    return len(self._sources)

  def __getitem__(self, i: int) -> dict[str, Any]:
    text = self._blob[self._offsets[i]:self._offsets[i + 1]].decode("utf-8")
    return {"source": self._sources[i], "text": text, "image_folder": self.image_folder, "image_data": None}


def open_source(data_file: DataFile):
  """The record source of a data file: `JsonSource`, or `tfds_llava.TfdsSource` for a converted folder."""
  if os.path.isdir(data_file.path):
    from llava_jax.data import tfds_llava  # pylint: disable=g-import-not-at-top
    return tfds_llava.TfdsSource(data_file.path)
  if not os.path.exists(data_file.path):
    raise FileNotFoundError(f"data file {data_file.path} does not exist")
  return JsonSource(data_file.path, data_file.image_folder)


class MixtureSource:
  """Records of several sources with per-source weights; global index = position in their concatenation."""

  def __init__(self, sources: Sequence[Any], weights: Sequence[float]):
    if len(sources) != len(weights) or not sources:
      raise ValueError("need one weight per source and at least one source")
    self.sources = list(sources)
    self.weights = [float(w) for w in weights]
    self._starts = np.cumsum([0] + [len(s) for s in self.sources], dtype=np.int64)
    self.lengths = np.concatenate([np.asarray(s.lengths, np.int32) for s in self.sources])
    self.has_image = np.concatenate([np.asarray(s.has_image, bool) for s in self.sources])

  @classmethod
  def from_files(cls, data_files: Any) -> "MixtureSource":
    files = parse_data_files(data_files)
    return cls([open_source(f) for f in files], [f.weight for f in files])

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getitem__(self, i: int) -> dict[str, Any]:
    s = int(np.searchsorted(self._starts, i, side="right")) - 1
    return self.sources[s][int(i - self._starts[s])]

  def epoch_indices(self, rng: np.random.Generator) -> np.ndarray:
    """int64[M]: the global indices one epoch visits (weight w: floor(w) times each, plus a random fraction)."""
    parts = []
    for start, source, w in zip(self._starts, self.sources, self.weights):
      n = len(source)
      idx = np.arange(start, start + n, dtype=np.int64)
      whole, frac = int(w), w - int(w)
      parts.extend([idx] * whole)
      take = int(round(frac * n))
      if take:
        parts.append(np.sort(rng.choice(idx, size=take, replace=False)))
    return np.concatenate(parts) if parts else np.zeros([0], np.int64)


class SkipStats:
  """Applies the bad-input policy and counts skipped records by reason.

  Lives in the main process (after the workers), so its counts are exact; its `state()` is part of the
  iterator state, so a resumed run continues the counts.
  """

  def __init__(self, policy: str = "skip"):
    if policy not in POLICIES:
      raise ValueError(f"bad_input policy must be one of {POLICIES}, got {policy!r}")
    self.policy = policy
    self.counts: collections.Counter[str] = collections.Counter()
    self.truncated_records = 0  # kept records that lost supervised tokens to max_length
    self.truncated_labels = 0  # the supervised tokens they lost

  def add(self, rid: str, reason: str, detail: str) -> None:
    """Counts and logs one skipped record; in 'strict' mode raises `BadInputError` instead."""
    if self.policy == "strict":
      raise BadInputError(f"record {rid!r}: {reason}: {detail} (bad_input='strict'; use 'skip' to skip and count)")
    self.counts[reason] += 1
    logging.warning("skipping record %r: %s: %s", rid, reason, detail)

  def add_truncated(self, rid: str, labels_cut: int, max_length: int) -> None:
    """Counts a record kept with `labels_cut` of its supervised tokens cut by truncation (logs the first 20)."""
    self.truncated_records += 1
    self.truncated_labels += labels_cut
    if self.truncated_records <= 20:
      logging.warning("record %r: truncated to %d positions, %d supervised token(s) cut (counted%s)", rid,
                      max_length, labels_cut, "; later ones are only counted" if self.truncated_records == 20 else "")

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def summary(self) -> str:
    parts = ", ".join(f"{r}={self.counts[r]}" for r in REASONS if self.counts[r])
    text = f"bad input: skipped {self.total} record(s): {parts}" if self.total else "bad input: no records skipped"
    if self.truncated_records:
      text += (f"; truncated {self.truncated_records} kept record(s) to max_length, cutting "
               f"{self.truncated_labels} supervised token(s)")
    return text

  def state(self) -> dict[str, int]:
    return {**{r: int(self.counts[r]) for r in REASONS}, "truncated_records": self.truncated_records,
            "truncated_labels": self.truncated_labels}

  def set_state(self, state: dict[str, int]) -> None:
    state = dict(state)
    self.truncated_records = int(state.pop("truncated_records", 0))  # absent in states written before them
    self.truncated_labels = int(state.pop("truncated_labels", 0))
    self.counts = collections.Counter({r: int(n) for r, n in state.items() if n})


def iter_parsed(source: Any, policy: str = "skip", stats: SkipStats | None = None) -> Iterable[ParsedRecord]:
  """The valid records of a source in order, applying the policy to the others (for tools, not training)."""
  stats = stats or SkipStats(policy)
  for i in range(len(source)):
    element = source[i]
    try:
      yield parse_record(element["text"], element["source"])
    except BadRecord as e:
      stats.add(record_id(element["text"], element["source"]), e.reason, e.detail)
