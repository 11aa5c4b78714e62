"""CLIP vision tower against transformers' CLIPVisionModel (tiny random configs, fp32)."""
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from llava_jax.models import loaders
from llava_jax.models.clip import CLIPVisionTransformer
from llava_jax.models.config import RuntimeConfig, VisionConfig
from tests.parity import assert_fp32_close


def _hf_clip(image_size=28, patch_size=14, layers=3, seed=0):
  torch.manual_seed(seed)
  cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=4, image_size=image_size, patch_size=patch_size)
  return transformers.CLIPVisionModel(cfg).eval()


def _ours(hf, **runtime):
  model = CLIPVisionTransformer(VisionConfig.from_hf(hf.config), RuntimeConfig(**runtime), rngs=nnx.Rngs(1))
  nnx.update(model, loaders.load_clip_state_dict(model, hf.state_dict()))
  return model


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("image_size,patch_size", [(28, 14), (42, 14)])
def test_every_hidden_state_matches(scan, image_size, patch_size):
  hf = _hf_clip(image_size, patch_size)
  ours = _ours(hf, scan_layers=scan)
  pixels = np.random.RandomState(0).randn(2, 3, image_size, image_size).astype(np.float32)
  with torch.no_grad():
    ref = hf(torch.from_numpy(pixels), output_hidden_states=True)
  _, ours_all = ours(pixels.transpose(0, 2, 3, 1), return_all=True)
  assert ours_all.shape[0] == len(ref.hidden_states)
  for i, ref_h in enumerate(ref.hidden_states):
    assert_fp32_close(ours_all[i], ref_h.numpy(), err_msg=f"hidden {i}")


@pytest.mark.parametrize("select_layer,select", [(-2, "patch"), (-2, "cls_patch"), (-1, "patch"), (1, "patch")])
def test_llava_feature_selection(select_layer, select):
  hf = _hf_clip(layers=3)
  ours = _ours(hf)
  pixels = np.random.RandomState(1).randn(3, 3, 28, 28).astype(np.float32)
  with torch.no_grad():
    hidden = hf(torch.from_numpy(pixels), output_hidden_states=True).hidden_states[select_layer].numpy()
  expected = hidden[:, 1:] if select == "patch" else hidden
  got = ours.features(pixels.transpose(0, 2, 3, 1), select_layer, select)
  assert_fp32_close(got, expected)


def test_full_clip_model_keys_text_tower_ignored():
  torch.manual_seed(0)
  cfg = transformers.CLIPConfig(
      text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       vocab_size=50, max_position_embeddings=16),
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         image_size=28, patch_size=14), projection_dim=8)
  full = transformers.CLIPModel(cfg).eval()
  model = CLIPVisionTransformer(VisionConfig.from_hf(cfg.vision_config), rngs=nnx.Rngs(0))
  nnx.update(model, loaders.load_clip_state_dict(model, full.state_dict()))
  pixels = np.random.RandomState(2).randn(1, 3, 28, 28).astype(np.float32)
  with torch.no_grad():
    ref = full.vision_model(torch.from_numpy(pixels)).last_hidden_state.numpy()
  assert_fp32_close(model(pixels.transpose(0, 2, 3, 1)), ref)


def test_shape_mismatch_and_missing_keys_are_listed():
  hf = _hf_clip()
  sd = dict(hf.state_dict())
  del sd["encoder.layers.1.mlp.fc1.weight"]
  sd["encoder.layers.0.mlp.fc2.weight"] = torch.zeros(5, 5)
  sd["encoder.layers.0.extra.weight"] = torch.zeros(1)
  model = CLIPVisionTransformer(VisionConfig.from_hf(hf.config), rngs=nnx.Rngs(0))
  with pytest.raises(loaders.CheckpointMismatchError) as err:
    loaders.load_clip_state_dict(model, sd)
  msg = str(err.value)
  assert "missing: vision.encoder.layers.1.mlp.fc1.weight" in msg
  assert "shape: vision.encoder.layers.0.mlp.fc2.weight" in msg
  assert "unexpected: vision.encoder.layers.0.extra.weight" in msg
