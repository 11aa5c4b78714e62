"""LLaVA JSON + images -> a TFDS dataset in ArrayRecord shards, read back by random access without TensorFlow.

    python -m llava_jax.data.tfds_llava --json llava_v1_5_mix665k.json --image-folder data/ --output /data/tfds

Each example holds the record exactly as read (`record_json`: its JSON text, a malformed JSONL line included) and
its images as encoded file bytes (`image_bytes`, one per `image` path, in order; `image_found` is False where the
file did not exist). The conversion does not judge the data: the pipeline validates TFDS and JSON records with
the same code, so both paths give the same samples and the same skip reasons. Records keep their file order
(`disable_shuffling`), so with the same seed both paths give the same batches.

The word counts and modalities that `group_by_modality_length` needs are kept in the dataset's metadata
(`metadata.json`), so opening a dataset does not read its examples.

`TfdsSource(path)` is the record source the pipeline uses for a data file that is such a folder; it opens
`tfds.builder_from_directory(path).as_data_source('train')` lazily (also in each grain worker).
"""
from __future__ import annotations

import argparse
import glob
import os
from typing import Any, Sequence

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from llava_jax.data import records

VERSION = "1.0.0"


class LlavaBuilderConfig(tfds.core.BuilderConfig):
  """Which JSON file and image folder to convert (`name` names the config folder)."""

  def __init__(self, *, json_path: str = "", image_folder: str | None = None, **kwargs):
    kwargs.setdefault("version", VERSION)
    super().__init__(**kwargs)
    self.json_path = json_path
    self.image_folder = image_folder


class LlavaConversations(tfds.core.GeneratorBasedBuilder):
  """LLaVA conversations with their images (config: a JSON/JSONL file and its image folder)."""

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {str(VERSION): "LLaVA records as JSON text, images as encoded bytes."}
  BUILDER_CONFIGS = [LlavaBuilderConfig(name="default", description="pass config=LlavaBuilderConfig(...)")]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="LLaVA visual-instruction records (JSON text) with their images (encoded bytes).",
        features=tfds.features.FeaturesDict({
            "source": tfds.features.Text(),  # 'file:line' of the record in the JSON file
            "record_json": tfds.features.Text(),
            "image_names": tfds.features.Sequence(tfds.features.Text()),
            "image_bytes": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
            "image_found": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.bool_)),
        }),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,  # keep the file order
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    if not self.builder_config.json_path:
      raise ValueError("LlavaConversations needs config=LlavaBuilderConfig(json_path=..., image_folder=...)")
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    cfg = self.builder_config
    folder = cfg.image_folder if cfg.image_folder is not None else os.path.dirname(cfg.json_path)
    items = records.read_records(cfg.json_path)
    est = [records.estimate_length(obj) for _, _, obj in items]
    self.info.metadata["lengths"] = [int(w) for w, _ in est]
    self.info.metadata["has_image"] = [bool(m) for _, m in est]
    self.info.metadata["json_path"] = os.path.abspath(cfg.json_path)
    stats = records.SkipStats("skip")
    for i, (source, text, _) in enumerate(items):
      try:
        names = records.parse_record(text, source).images
      except records.BadRecord as e:  # kept as it is: the pipeline reports it
        names = ()
        stats.counts[e.reason] += 1
      blobs, found = [], []
      for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
          with open(path, "rb") as f:
            blobs.append(f.read())
          found.append(True)
        else:
          blobs.append(b"")
          found.append(False)
          stats.counts["missing_image"] += 1
      yield i, {"source": source, "record_json": text, "image_names": list(names), "image_bytes": blobs,
                "image_found": found}
    logging.info("converted %d records from %s; the pipeline will report: %s", len(items), cfg.json_path,
                 stats.summary())


def convert(json_path: str, image_folder: str | None, output_dir: str, *, name: str | None = None) -> str:
  """Writes the ArrayRecord dataset under output_dir; returns its folder (the path to give the pipeline)."""
  name = name or os.path.splitext(os.path.basename(json_path))[0].replace("-", "_").replace(".", "_").lower()
  config = LlavaBuilderConfig(name=name, json_path=os.fspath(json_path),
                              image_folder=None if image_folder is None else os.fspath(image_folder),
                              description=f"converted from {json_path}")
  builder = LlavaConversations(config=config, data_dir=os.fspath(output_dir), file_format="array_record")
  builder.download_and_prepare()
  return os.fspath(builder.data_dir)


def find_dataset_dir(path: str) -> str:
  """The folder holding dataset_info.json: `path` itself or its single descendant that has one."""
  if os.path.isfile(os.path.join(path, "dataset_info.json")):
    return path
  found = sorted(glob.glob(os.path.join(glob.escape(path), "**", "dataset_info.json"), recursive=True))
  if len(found) != 1:
    raise ValueError(f"{path}: expected one TFDS dataset (dataset_info.json) below it, found {len(found)}")
  return os.path.dirname(found[0])


class TfdsSource:
  """Random access to a converted dataset; elements as `records.JsonSource` gives them (with image bytes)."""

  def __init__(self, path: str):
    self.path = find_dataset_dir(os.fspath(path))
    builder = tfds.builder_from_directory(self.path)
    meta = builder.info.metadata or {}
    self._len = builder.info.splits["train"].num_examples
    if "lengths" not in meta or len(meta["lengths"]) != self._len:
      raise ValueError(f"{self.path}: not written by llava_jax.data.tfds_llava (no record lengths in metadata)")
    self.lengths = np.asarray(meta["lengths"], np.int32)
    self.has_image = np.asarray(meta["has_image"], bool)
    self._source = None

  def __getstate__(self):
    return dict(self.__dict__, _source=None)

  def __len__(self) -> int:
    return self._len

  def _data_source(self):
    if self._source is None:
      self._source = tfds.builder_from_directory(self.path).as_data_source(split="train")
    return self._source

  def __getitem__(self, i: int) -> dict[str, Any]:
    ex = self._data_source()[int(i)]
    text = ex["record_json"]
    found = [bool(x) for x in ex["image_found"]]
    data = [bytes(b) if ok else None for b, ok in zip(ex["image_bytes"], found)]
    return {"source": _str(ex["source"]), "text": _str(text), "image_folder": None, "image_data": data}


def _str(x: Any) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m llava_jax.data.tfds_llava", description=__doc__.split("\n")[0])
  parser.add_argument("--json", required=True, help="LLaVA JSON or JSONL file")
  parser.add_argument("--image-folder", default=None, help="folder the records' image paths are relative to "
                      "(default: the JSON file's folder)")
  parser.add_argument("--output", required=True, help="output folder (a TFDS data_dir)")
  parser.add_argument("--name", default=None, help="config name (default: from the JSON file name)")
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  print(convert(args.json, args.image_folder, args.output, name=args.name))


if __name__ == "__main__":
  main()
