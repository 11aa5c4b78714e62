"""The model folder: save / load round trips (numpy and sharded jax arrays, dtype casts), tokenizer, atomic writes
and the errors for incomplete folders."""
import json
import os

import jax
import numpy as np
import pytest
import transformers
from flax import nnx

from llava_jax import model_folder, sharding
from llava_jax.models.config import ModelConfig, RuntimeConfig, TextConfig, VisionConfig
from llava_jax.models.llava import LlavaModel

CFG = ModelConfig(
    vision=VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                        image_size=28, patch_size=14),
    text=TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2),
    template="llava_v1", image_aspect_ratio="square", image_token_id=None)


def random_params(seed=0):
  """Random numpy parameters shaped like the model's (nested dict as `to_pure_dict()` gives)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), model_folder.abstract_params(CFG))


def leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def assert_same(a, b, cast=None):
  a, b = leaves(a), leaves(b)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k].astype(cast) if cast else b[k], err_msg=k)


def test_round_trip_numpy_params_and_config(tmp_path):
  params = random_params()  # numpy, as conversion gives
  model_folder.save_model_folder(tmp_path / "m", CFG, params, extra={"source": {"note": "test"}})
  assert sorted(os.listdir(tmp_path)) == ["m"]  # renamed into place, nothing left beside it
  config = json.loads((tmp_path / "m" / "config.json").read_text())
  assert (config["format"], config["version"], config["source"]) == ("llava_jax", 1, {"note": "test"})
  assert model_folder.load_config(tmp_path / "m") == CFG
  model = model_folder.load_model(tmp_path / "m")
  assert isinstance(model, LlavaModel) and model.cfg == CFG
  assert_same(nnx.state(model, nnx.Param).to_pure_dict(), params)
  bf16 = model_folder.load_model(tmp_path / "m", RuntimeConfig(param_dtype="bfloat16"))
  restored = nnx.state(bf16, nnx.Param).to_pure_dict()
  assert {str(v.dtype) for v in jax.tree.leaves(restored)} == {"bfloat16"}
  assert_same(restored, params, cast=jax.numpy.bfloat16)
  numpy_params = model_folder.load_numpy_params(tmp_path / "m")
  assert isinstance(numpy_params["projector"]["linears"]["1"]["kernel"], np.ndarray)
  np.testing.assert_array_equal(numpy_params["projector"]["linears"]["1"]["kernel"],
                                params["projector"]["linears"][1]["kernel"])


def test_sharded_save_and_load_on_a_mesh(tmp_path):
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  abstract = nnx.state(model_folder.abstract_model(CFG), nnx.Param)
  params = jax.device_put(random_params(1), sharding.state_shardings(abstract.to_pure_dict(), mesh))
  abstract.replace_by_pure_dict(params)
  params = abstract  # an nnx.State of sharded jax arrays, as a trainer holds
  kernel = params["language_model"]["layers"]["mlp"]["up_proj"]["kernel"].value
  assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
  model_folder.save_model_folder(tmp_path / "m", CFG, params)
  loaded = model_folder.load_model(tmp_path / "m", mesh=mesh)
  state = nnx.state(loaded, nnx.Param)
  assert_same(state.to_pure_dict(), params.to_pure_dict())
  expected = sharding.state_shardings(state, mesh)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(expected)):
    assert got.sharding.is_equivalent_to(want, got.ndim), jax.tree_util.keystr(path)
  unsharded = model_folder.load_model(tmp_path / "m")
  assert_same(nnx.state(unsharded, nnx.Param).to_pure_dict(), params.to_pure_dict())


def test_load_params_for_a_trainer(tmp_path):
  params = random_params(2)
  model_folder.save_model_folder(tmp_path / "m", CFG, params)
  abstract = model_folder.abstract_params(CFG, RuntimeConfig(param_dtype="bfloat16"))
  restored = model_folder.load_params(tmp_path / "m", abstract)
  assert_same(restored, params, cast=jax.numpy.bfloat16)


def test_relative_paths_save_and_load(tmp_path, monkeypatch):
  # the presets' init_model="models/..." and `--workdir=runs/stage1` are relative; orbax wants absolute paths
  monkeypatch.chdir(tmp_path)
  (tmp_path / "runs").mkdir()
  params = random_params(3)
  model_folder.save_model_folder("runs/m", CFG, params)
  model_folder.save_model_folder("runs/m", CFG, params, overwrite=True)
  assert sorted(os.listdir(tmp_path / "runs")) == ["m"]
  assert_same(nnx.state(model_folder.load_model("runs/m"), nnx.Param).to_pure_dict(), params)
  assert_same(model_folder.load_numpy_params("runs/m"), _str_keys(params))


def test_tokenizer_saved_copied_and_loaded(tmp_path, llama_tokenizer_dir):
  params = random_params()
  tok = transformers.AutoTokenizer.from_pretrained(str(llama_tokenizer_dir))
  model_folder.save_model_folder(tmp_path / "a", CFG, params, tokenizer=tok)
  model_folder.save_model_folder(tmp_path / "b", CFG, params, tokenizer_source_dir=llama_tokenizer_dir)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (tmp_path / "b" / name).read_bytes() == (llama_tokenizer_dir / name).read_bytes()
  for folder in ("a", "b"):
    assert model_folder.load_tokenizer(tmp_path / folder)("Hello world").input_ids == [1, 15043, 3186]
  model_folder.save_model_folder(tmp_path / "c", CFG, params)
  with pytest.raises(model_folder.ModelFolderError, match="c: the model folder has no tokenizer files"):
    model_folder.load_tokenizer(tmp_path / "c")


def test_failed_save_leaves_nothing(tmp_path):
  params = random_params()
  bad = random_params()
  bad["language_model"]["norm"]["weight"] = np.zeros(3, np.float32)
  del bad["projector"]["linears"][1]["bias"]
  with pytest.raises(model_folder.ModelFolderError) as e:
    model_folder.save_model_folder(tmp_path / "m", CFG, bad)
  assert "missing: projector.linears.1.bias" in str(e.value)
  assert "shape: language_model.norm.weight: (3,), the config needs (16,)" in str(e.value)
  empty = tmp_path / "no_tokenizer"
  empty.mkdir()
  with pytest.raises(model_folder.ModelFolderError, match="no tokenizer files"):  # fails after params are written
    model_folder.save_model_folder(tmp_path / "m", CFG, params, tokenizer_source_dir=empty)
  assert sorted(os.listdir(tmp_path)) == ["no_tokenizer"]


def test_existing_folder_needs_overwrite(tmp_path):
  model_folder.save_model_folder(tmp_path / "m", CFG, random_params(0))
  with pytest.raises(model_folder.ModelFolderError, match="already exists"):
    model_folder.save_model_folder(tmp_path / "m", CFG, random_params(1))
  model_folder.save_model_folder(tmp_path / "m", CFG, random_params(1), overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["m"]
  assert_same(model_folder.load_numpy_params(tmp_path / "m"), _str_keys(random_params(1)))


def _str_keys(tree):
  return {str(k): _str_keys(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def test_load_errors_name_the_folder(tmp_path):
  with pytest.raises(model_folder.ModelFolderError, match="nope: no such model folder"):
    model_folder.load_model(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(model_folder.ModelFolderError, match="empty: not a llava_jax model folder"):
    model_folder.load_config(tmp_path / "empty")
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llava"}))
  with pytest.raises(model_folder.ModelFolderError, match="convert transformers checkpoints"):
    model_folder.load_model(tmp_path / "hf")
  model_folder.save_model_folder(tmp_path / "m", CFG, random_params())
  os.rename(tmp_path / "m" / "params", tmp_path / "params_moved")
  with pytest.raises(model_folder.ModelFolderError, match="m: the model folder has no params/"):
    model_folder.load_model(tmp_path / "m")
  os.rename(tmp_path / "params_moved", tmp_path / "m" / "params")
  config = json.loads((tmp_path / "m" / "config.json").read_text())
  config["model"]["text"]["num_hidden_layers"] = 3  # the saved arrays no longer fit the config
  (tmp_path / "m" / "config.json").write_text(json.dumps(config))
  with pytest.raises(model_folder.ModelFolderError, match=r"language_model.layers.mlp.up_proj.kernel: \(2, 16, 32\)"):
    model_folder.load_model(tmp_path / "m")
