"""Key layouts: llava-hf on disk and in memory, original LLaVA, and the export round trip."""
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from llava_jax.models import loaders
from llava_jax.models.config import ModelConfig
from llava_jax.models.llava import LlavaModel
from tests.models.test_llava import hf_llava


def _flat(state):
  return {path: np.asarray(getattr(v, "value", v)) for path, v in nnx.to_flat_state(state)}


def _to_original_layout(on_disk: dict) -> dict:
  """llava-hf on-disk names -> original LLaVA names (spec: model.mm_projector.{0,2}, model.*, lm_head)."""
  out = {}
  for key, value in on_disk.items():
    for old, new in [("multi_modal_projector.linear_1.", "model.mm_projector.0."),
                     ("multi_modal_projector.linear_2.", "model.mm_projector.2."),
                     ("vision_tower.vision_model.", "model.vision_tower.vision_tower.vision_model."),
                     ("vision_tower.", "model.vision_tower.vision_tower.vision_model."),
                     ("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")]:
      if key.startswith(old):
        key = new + key[len(old):]
        break
    out[key] = value
  return out


@pytest.fixture(scope="module")
def hf_and_model():
  hf = hf_llava()
  model = nnx.eval_shape(lambda: LlavaModel(ModelConfig.from_hf_llava(hf.config), rngs=nnx.Rngs(0)))
  return hf, model


def test_on_disk_and_original_layouts_equal_in_memory(hf_and_model, tmp_path):
  hf, model = hf_and_model
  reference = _flat(loaders.load_llava_state_dict(model, hf.state_dict()))
  hf.save_pretrained(tmp_path)
  on_disk = load_file(str(tmp_path / "model.safetensors"))
  assert any(k.startswith("language_model.model.") for k in on_disk)  # the old on-disk names really are used
  original = _to_original_layout(on_disk)
  assert "model.mm_projector.2.weight" in original
  for sd in (on_disk, original):
    got = _flat(loaders.load_llava_state_dict(model, sd))
    assert got.keys() == reference.keys()
    for path in reference:
      np.testing.assert_array_equal(got[path], reference[path], err_msg=str(path))


def test_original_layout_without_vision_takes_clip_weights(hf_and_model, tmp_path):
  hf, model = hf_and_model
  hf.save_pretrained(tmp_path)
  original = {k: v for k, v in _to_original_layout(load_file(str(tmp_path / "model.safetensors"))).items()
              if "vision_tower" not in k}
  with pytest.raises(loaders.CheckpointMismatchError, match="missing: vision.embeddings.patch_embedding.weight"):
    loaders.load_llava_state_dict(model, original)
  clip_sd = {k[len("model.vision_tower."):]: v for k, v in hf.state_dict().items()
             if k.startswith("model.vision_tower.")}
  merged = loaders.MergedView(loaders.canonical_tensors(original, "llava"),
                              loaders.canonical_tensors(clip_sd, "clip"))
  got = _flat(loaders.load_params(model, merged))
  reference = _flat(loaders.load_llava_state_dict(model, hf.state_dict()))
  for path in reference:
    np.testing.assert_array_equal(got[path], reference[path], err_msg=str(path))


def test_export_round_trip(hf_and_model):
  hf, model = hf_and_model
  params = loaders.load_llava_state_dict(model, hf.state_dict())
  exported = dict(loaders.export_tensors(params, model))
  view = loaders.canonical_tensors(hf.state_dict(), "llava")
  assert set(exported) == set(view)
  for key, value in exported.items():
    np.testing.assert_array_equal(value, view[key].numpy(), err_msg=key)


def test_unknown_keys_are_reported(hf_and_model):
  hf, model = hf_and_model
  sd = dict(hf.state_dict())
  sd["mystery.weight"] = sd["lm_head.weight"]
  with pytest.raises(loaders.CheckpointMismatchError, match="unexpected: unknown.mystery.weight"):
    loaders.load_llava_state_dict(model, sd)
