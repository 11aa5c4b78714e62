"""Lazy checkpoint readers (safetensors, sharded, .bin in both torch formats) and the sharded writer."""
import json
import os

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from llava_jax import checkpoint_io


def test_bin_formats_and_dtypes(tmp_path):
  tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "c": torch.arange(4).to(torch.float16)}
  torch.save(tensors, tmp_path / "zip.bin")
  torch.save(tensors, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)  # cannot be memory-mapped
  for name in ("zip.bin", "legacy.bin"):
    reader = checkpoint_io.open_state_dict(tmp_path / name)
    assert sorted(reader) == ["a", "b", "c"]
    np.testing.assert_array_equal(reader["a"], tensors["a"].numpy())
    assert reader["b"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(reader["b"].astype(np.float32), tensors["b"].float().numpy())
    assert reader["c"].dtype == np.float16


def test_folder_preference_and_index(tmp_path):
  save_file({"x": np.ones(2, np.float32)}, str(tmp_path / "model.safetensors"))
  torch.save({"y": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
  assert list(checkpoint_io.open_state_dict(tmp_path)) == ["x"]  # safetensors first, as transformers
  sharded = tmp_path / "sharded"
  sharded.mkdir()
  save_file({"p": np.ones(1, np.float32)}, str(sharded / "s1.safetensors"))
  save_file({"q": np.ones(1, np.float32)}, str(sharded / "s2.safetensors"))
  (sharded / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {"p": "s1.safetensors", "q": "s2.safetensors"}}))
  reader = checkpoint_io.open_state_dict(sharded)
  assert sorted(reader) == ["p", "q"] and reader.source("q").name == "s2.safetensors"
  (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"p": "gone.safetensors"}}))
  with pytest.raises(checkpoint_io.CheckpointFormatError, match="lists shard files that do not exist"):
    checkpoint_io.open_state_dict(sharded)


def test_bad_files(tmp_path):
  save_file({"k": np.ones(1, np.float32)}, str(tmp_path / "a.safetensors"))
  save_file({"k": np.ones(1, np.float32)}, str(tmp_path / "b.safetensors"))
  with pytest.raises(checkpoint_io.CheckpointFormatError, match="key 'k' is in both"):
    checkpoint_io.open_state_dict(tmp_path)
  torch.save([torch.zeros(1)], tmp_path / "list.bin")
  with pytest.raises(checkpoint_io.CheckpointFormatError, match="list.bin: expected a flat dict of tensors"):
    checkpoint_io.open_state_dict(tmp_path / "list.bin")
  (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(checkpoint_io.CheckpointFormatError, match="junk.safetensors: not a readable safetensors"):
    checkpoint_io.open_state_dict(tmp_path / "junk.safetensors")
  (tmp_path / "empty").mkdir()
  with pytest.raises(checkpoint_io.CheckpointFormatError, match="empty: no weights found"):
    checkpoint_io.open_state_dict(tmp_path / "empty")


class _RunsCode:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def test_bin_refusals_name_the_global_and_never_advise_weights_only_false(tmp_path):
  """A pickle calling os.system (both torch formats) is unsafe and names the global; b"garbage" is just unreadable.
  Neither message passes on torch's advice to re-run with weights_only=False."""
  marker = tmp_path / "pwned"
  payload = {"a": torch.zeros(2), "x": _RunsCode(marker)}
  torch.save(payload, tmp_path / "zip.bin")
  torch.save(payload, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
  for name in ("zip.bin", "legacy.bin"):
    with pytest.raises(checkpoint_io.UnsafeCheckpointError, match=rf"{name}: refused .*references posix\.system") as e:
      checkpoint_io.open_state_dict(tmp_path / name)
    assert "False" not in str(e.value)
  assert not marker.exists()
  (tmp_path / "garbage.bin").write_bytes(b"garbage" * 100)
  with pytest.raises(checkpoint_io.CheckpointFormatError, match="garbage.bin: cannot read as a PyTorch checkpoint") as e:
    checkpoint_io.open_state_dict(tmp_path / "garbage.bin")
  assert not isinstance(e.value, checkpoint_io.UnsafeCheckpointError) and "False" not in str(e.value)


def test_sharded_writer(tmp_path):
  tensors = [(f"t{i}", np.full((250,), i, np.float32)) for i in range(5)]  # 1000 bytes each
  names = checkpoint_io.write_sharded_safetensors(iter(tensors), tmp_path, max_shard_bytes=2500)
  assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] + ["model.safetensors.index.json"]
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert index["metadata"]["total_size"] == 5000
  for key, value in tensors:
    np.testing.assert_array_equal(load_file(str(tmp_path / index["weight_map"][key]))[key], value)
  assert sorted(os.listdir(tmp_path)) == sorted(names)
  one = tmp_path / "one"
  one.mkdir()
  assert checkpoint_io.write_sharded_safetensors(iter(tensors), one, max_shard_bytes=10**6) == ["model.safetensors"]
  assert checkpoint_io.parse_size("5GB") == 5 * 10**9 and checkpoint_io.parse_size("200KiB") == 200 * 1024
  with pytest.raises(ValueError, match="not a size"):
    checkpoint_io.parse_size("five")
