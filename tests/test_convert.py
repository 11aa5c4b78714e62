"""`python -m llava_jax.convert`: tiny random transformers checkpoints (save_pretrained, CPU, fp32) converted and
compared with transformers' own forward passes."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from llava_jax import checkpoint_io, convert, model_folder
from llava_jax.convert import verify
from llava_jax.models import loaders
from llava_jax.models.config import IMAGE_TOKEN_INDEX
from tests.parity import assert_fp32_close

S, PATCH, N_IMG = 28, 14, 4  # image size, patch size, patches per image
HF_IMAGE = 32000  # llava-hf's '<image>'
REF_IMAGE = 31999  # image token of the vocab-32000 reference model (any id: its rows are replaced by features)


def vision_config(layers=3):
  return transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                       num_attention_heads=4, image_size=S, patch_size=PATCH)


def text_config(vocab):
  return transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                  rope_theta=5e4, pad_token_id=0)


def tiny_llava(vocab, image_token, seed=0):
  torch.manual_seed(seed)
  cfg = transformers.LlavaConfig(vision_config=vision_config(), text_config=text_config(vocab),
                                 image_token_index=image_token, vision_feature_layer=-2,
                                 vision_feature_select_strategy="default", projector_hidden_act="gelu",
                                 image_seq_length=N_IMG)
  return transformers.LlavaForConditionalGeneration(cfg).eval()


def llava_hf_tokenizer(llama_tokenizer_dir):
  """The LLaMA tokenizer with '<image>' and '<pad>' added as llava-hf did (32000, 32001)."""
  tok = transformers.AutoTokenizer.from_pretrained(str(llama_tokenizer_dir))
  tok.add_tokens(transformers.AddedToken("<image>", special=True, normalized=False), special_tokens=True)
  tok.add_special_tokens({"pad_token": "<pad>"})
  assert tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001]
  return tok


def sample(image_token, seed=0):
  """One sample: ids with one placeholder (ours) and expanded (HF), and an image float32[1, S, S, 3]."""
  rng = np.random.RandomState(seed)
  ids = [1, 3148, 1001, 29901, image_token] + list(rng.randint(3, 31000, 6))
  ours = np.array([[IMAGE_TOKEN_INDEX if t == image_token else t for t in ids]], np.int32)
  hf = np.array([sum(([t] * N_IMG if t == image_token else [t] for t in ids), [])], np.int64)
  return ours, hf, rng.randn(1, S, S, 3).astype(np.float32)


def hf_logits(model, hf_ids, image):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(hf_ids), attention_mask=torch.ones_like(torch.from_numpy(hf_ids)),
                 pixel_values=torch.from_numpy(image.transpose(0, 3, 1, 2))).logits[0].numpy()


def our_logits(folder, ids, image, length):
  return verify._our_logits(model_folder.load_model(folder), ids, image, length)


def run(argv, capsys=None):
  code = convert.main([str(a) for a in argv])
  out = capsys.readouterr() if capsys is not None else None
  return code, out


def to_original(on_disk: dict) -> dict:
  """llava-hf on-disk names -> original LLaVA names (spec: model.mm_projector.{0,2}, model.*, lm_head)."""
  renames = [("multi_modal_projector.linear_1.", "model.mm_projector.0."),
             ("multi_modal_projector.linear_2.", "model.mm_projector.2."),
             ("vision_tower.vision_model.", "model.vision_tower.vision_tower.vision_model."),
             ("vision_tower.", "model.vision_tower.vision_tower.vision_model."),  # transformers 5 writes this
             ("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")]
  out = {}
  for key, value in on_disk.items():
    for old, new in renames:
      if key.startswith(old):
        key = new + key[len(old):]
        break
    else:
      raise KeyError(key)
    out[key] = value
  return out


def original_config(model) -> dict:
  """config.json of an original-layout LLaVA checkpoint (LLaMA fields + mm_*; model_type 'llava' as released)."""
  config = model.config.text_config.to_dict()
  config.update(model_type="llava", architectures=["LlavaLlamaForCausalLM"], mm_hidden_size=32,
                mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                mm_vision_tower="openai/clip-vit-large-patch14-336", image_aspect_ratio="pad",
                mm_use_im_start_end=False, mm_use_im_patch_token=False, mm_patch_merge_type="flat")
  return config


def save_bin_shards(state: dict, folder: pathlib.Path, shards: int):
  keys = sorted(state)
  weight_map = {}
  for i in range(shards):
    name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
    part = keys[i::shards]
    torch.save({k: torch.from_numpy(np.asarray(state[k])).clone() for k in part}, folder / name)
    weight_map.update({k: name for k in part})
  (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def clip_folder(model, folder):
  """A CLIPVisionModel folder holding `model`'s vision tower."""
  clip = transformers.CLIPVisionModel(model.config.vision_config).eval()
  clip.load_state_dict(model.model.vision_tower.state_dict())
  clip.save_pretrained(folder)
  transformers.CLIPImageProcessor(size={"shortest_edge": S}, crop_size={"height": S, "width": S}).save_pretrained(
      folder)
  return folder


# --- Fixtures --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llava_hf(tmp_path_factory, llama_tokenizer_dir):
  """A llava-hf folder (vocab 32064, '<image>' 32000) saved by transformers, and the model."""
  model = tiny_llava(32064, HF_IMAGE)
  folder = tmp_path_factory.mktemp("llava_hf")
  model.save_pretrained(folder)
  llava_hf_tokenizer(llama_tokenizer_dir).save_pretrained(folder)
  return folder, model


@pytest.fixture(scope="module")
def original(tmp_path_factory, llama_tokenizer_dir):
  """An original-layout LLaVA folder without vision keys, as sharded .bin files; its CLIP folder; the reference
  model (vocab 32000, no '<image>' in the tokenizer, as the released LLaVA-1.5)."""
  model = tiny_llava(32000, REF_IMAGE, seed=1)
  tmp = tmp_path_factory.mktemp("original")
  model.save_pretrained(tmp / "hf")
  state = {k: v for k, v in to_original(load_file(str(tmp / "hf" / "model.safetensors"))).items()
           if "vision_tower" not in k}
  folder = tmp / "llava-v1.5"
  folder.mkdir()
  save_bin_shards(state, folder, shards=2)
  (folder / "config.json").write_text(json.dumps(original_config(model)))
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(llama_tokenizer_dir / name, folder / name)
  return folder, clip_folder(model, tmp / "clip"), model


@pytest.fixture(scope="module")
def original_converted(original, tmp_path_factory):
  folder, clip, _ = original
  out = tmp_path_factory.mktemp("converted") / "model"
  assert run(["from-hf", folder, "--output", out, "--vision", clip])[0] == 0
  return out


@pytest.fixture(scope="module")
def original_hf(original_converted, tmp_path_factory):
  """to-hf of `original_converted`, shards of at most 1 MB."""
  out = tmp_path_factory.mktemp("to_hf") / "hf"
  assert run(["to-hf", original_converted, "--output", out, "--max-shard-size", "1MB"])[0] == 0
  return out


# --- from-hf ---------------------------------------------------------------------------------------------------------


def test_from_hf_llava_hf_logits_equal_transformers(llava_hf, tmp_path, capsys):
  folder, model = llava_hf
  code, out = run(["from-hf", folder, "--output", tmp_path / "m"], capsys)
  assert code == 0, out.err
  cfg = model_folder.load_config(tmp_path / "m")
  assert (cfg.image_token_id, cfg.text.vocab_size, cfg.vision_feature_layer, cfg.template) == (
      HF_IMAGE, 32064, -2, "vicuna_v1")
  assert model_folder.load_tokenizer(tmp_path / "m").convert_tokens_to_ids("<image>") == HF_IMAGE
  ours, hf_ids, image = sample(HF_IMAGE)
  assert_fp32_close(our_logits(tmp_path / "m", ours, image, hf_ids.shape[1]), hf_logits(model, hf_ids, image))


def test_from_hf_tied_by_the_top_level_config_logits_equal_transformers(tmp_path, capsys):
  """transformers 5 ties lm_head by LlavaConfig.tie_word_embeddings, even when text_config's is False, and then saves
  no lm_head."""
  torch.manual_seed(4)
  text = text_config(32064)
  text.tie_word_embeddings = False
  config = transformers.LlavaConfig(vision_config=vision_config(), text_config=text, image_token_index=HF_IMAGE,
                                    image_seq_length=N_IMG, tie_word_embeddings=True)
  transformers.LlavaForConditionalGeneration(config).save_pretrained(tmp_path / "hf")
  assert not any("lm_head" in k for k in load_file(str(tmp_path / "hf" / "model.safetensors")))
  model = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
  code, out = run(["from-hf", tmp_path / "hf", "--output", tmp_path / "m"], capsys)
  assert code == 0, out.err
  assert model_folder.load_config(tmp_path / "m").text.tie_word_embeddings
  ours, hf_ids, image = sample(HF_IMAGE)
  assert_fp32_close(our_logits(tmp_path / "m", ours, image, hf_ids.shape[1]), hf_logits(model, hf_ids, image))


def test_from_hf_original_layout_bin_shards_with_vision_folder(original, original_converted):
  _, _, model = original
  cfg = model_folder.load_config(original_converted)
  assert (cfg.image_token_id, cfg.text.vocab_size, cfg.image_aspect_ratio, cfg.projector_type) == (
      None, 32000, "pad", "mlp2x_gelu")
  assert cfg.text.rope_theta == 5e4
  assert json.loads((original_converted / "config.json").read_text())["source"]["layout"] == "original"
  ours, hf_ids, image = sample(REF_IMAGE)
  assert_fp32_close(our_logits(original_converted, ours, image, hf_ids.shape[1]), hf_logits(model, hf_ids, image))


def test_sharded_safetensors_and_bf16(llava_hf, tmp_path):
  folder, model = llava_hf
  sharded = tmp_path / "sharded"
  model.save_pretrained(sharded, max_shard_size="300KB")
  for name in os.listdir(folder):
    if name.startswith("tokenizer"):
      shutil.copy(folder / name, sharded / name)
  assert (sharded / "model.safetensors.index.json").exists() and not (sharded / "model.safetensors").exists()
  assert run(["from-hf", sharded, "--output", tmp_path / "a", "--dtype", "bfloat16"])[0] == 0
  got = model_folder.load_numpy_params(tmp_path / "a")
  # the same tensors, rounded to bf16, as transformers' in-memory model
  ref = model.state_dict()
  np.testing.assert_array_equal(np.asarray(got["language_model"]["embed_tokens"]["embedding"]),
                                ref["model.language_model.embed_tokens.weight"].to(torch.bfloat16).float().numpy()
                                .astype(got["language_model"]["embed_tokens"]["embedding"].dtype))
  q = np.asarray(got["vision_tower"]["layers"]["self_attn"]["q_proj"]["kernel"][2], np.float32)
  np.testing.assert_array_equal(q, ref["model.vision_tower.encoder.layers.2.self_attn.q_proj.weight"]
                                .to(torch.bfloat16).float().numpy().T)
  assert str(got["projector"]["linears"]["1"]["bias"].dtype) == "bfloat16"


# --- assemble --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parts(tmp_path_factory, llama_tokenizer_dir):
  """A full CLIPModel folder (text tower to be ignored) and a LlamaForCausalLM folder with the tokenizer."""
  tmp = tmp_path_factory.mktemp("parts")
  torch.manual_seed(2)
  clip = transformers.CLIPModel(transformers.CLIPConfig(
      vision_config=vision_config(layers=4).to_dict(),
      text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       vocab_size=50, bos_token_id=0, eos_token_id=1), projection_dim=8)).eval()
  clip.save_pretrained(tmp / "clip")
  llama = transformers.LlamaForCausalLM(text_config(32000)).eval()
  llama.save_pretrained(tmp / "llm")
  on_disk = load_file(str(tmp / "llm" / "model.safetensors"))  # as pytorch_model.bin, like vicuna-7b-v1.5
  torch.save({k: torch.from_numpy(v) for k, v in on_disk.items()}, tmp / "llm" / "pytorch_model.bin")
  os.remove(tmp / "llm" / "model.safetensors")
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(llama_tokenizer_dir / name, tmp / "llm" / name)
  return tmp / "clip", clip, tmp / "llm", llama


def test_assemble_fresh_projector_matches_sources(parts, tmp_path, capsys):
  clip_dir, clip, llm_dir, llama = parts
  assert any(p.suffix == ".bin" for p in llm_dir.iterdir())
  code, out = run(["assemble", "--vision", clip_dir, "--llm", llm_dir, "--output", tmp_path / "m", "--seed", "3"],
                  capsys)
  assert code == 0, out.err
  cfg = model_folder.load_config(tmp_path / "m")
  assert (cfg.template, cfg.image_aspect_ratio, cfg.vision.num_hidden_layers) == ("plain", "square", 4)
  model = model_folder.load_model(tmp_path / "m")
  images = np.random.RandomState(0).randn(2, S, S, 3).astype(np.float32)
  with torch.no_grad():
    hidden = clip.vision_model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)),
                               output_hidden_states=True).hidden_states
  feats = nnx.jit(lambda m, x: m.vision_tower.features(x, -2, "patch"))(model, jnp.asarray(images))
  assert_fp32_close(feats, hidden[-2][:, 1:].numpy())
  ids = np.array([[1, 15043, 3186, 338, 263, 1243]], np.int32)
  with torch.no_grad():
    ref = llama(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
  assert_fp32_close(nnx.jit(lambda m, x: m.language_model(x))(model, jnp.asarray(ids)), ref)
  # fresh projector: torch.nn.Linear's default init U(-1/sqrt(fan_in), 1/sqrt(fan_in)), seeded
  for linear, fan_in in zip(model.projector.linears, (32, 32)):
    for p in (np.asarray(linear.kernel.value), np.asarray(linear.bias.value)):
      bound = 1 / np.sqrt(fan_in)
      assert np.abs(p).max() <= bound and abs(p.std() - bound / np.sqrt(3)) < 0.15 * bound
  assert model_folder.load_tokenizer(tmp_path / "m")("Hello world").input_ids == [1, 15043, 3186]
  code, _ = run(["assemble", "--vision", clip_dir, "--llm", llm_dir, "--output", tmp_path / "m2", "--seed", "3"])
  again = model_folder.load_numpy_params(tmp_path / "m2")["projector"]["linears"]["0"]["kernel"]
  np.testing.assert_array_equal(again, np.asarray(model.projector.linears[0].kernel.value))


@pytest.mark.parametrize("form", ["mm_projector.bin", "trainer_folder", "linear_safetensors"])
def test_assemble_with_stage1_projector(parts, tmp_path, form):
  clip_dir, _, llm_dir, _ = parts
  rng = np.random.RandomState(5)
  if form == "linear_safetensors":
    weights = {"model.mm_projector.weight": rng.randn(32, 32).astype(np.float32),
               "model.mm_projector.bias": rng.randn(32).astype(np.float32)}
    path, extra = tmp_path / "mm_projector.safetensors", ["--projector-type", "linear"]
    save_file(weights, str(path))
  else:
    weights = {f"model.mm_projector.{i}.{k}": rng.randn(*([32, 32] if k == "weight" else [32])).astype(np.float32)
               for i in (0, 2) for k in ("weight", "bias")}
    if form == "mm_projector.bin":
      path, extra = tmp_path / "mm_projector.bin", []
      torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, path)
    else:
      path, extra = tmp_path / "stage1", []
      path.mkdir()
      save_file(weights, str(path / "projector.safetensors"))
  assert run(["assemble", "--vision", clip_dir, "--llm", llm_dir, "--projector", path, "--output",
              tmp_path / "m", *extra])[0] == 0
  cfg = model_folder.load_config(tmp_path / "m")
  assert (cfg.template, cfg.image_aspect_ratio) == ("vicuna_v1", "pad")
  linears = model_folder.load_numpy_params(tmp_path / "m")["projector"]["linears"]
  names = ["model.mm_projector"] if form == "linear_safetensors" else ["model.mm_projector.0", "model.mm_projector.2"]
  assert len(linears) == len(names)
  for i, name in enumerate(names):
    np.testing.assert_array_equal(linears[str(i)]["kernel"], weights[name + ".weight"].T)
    np.testing.assert_array_equal(linears[str(i)]["bias"], weights[name + ".bias"])


# --- to-hf and verify ------------------------------------------------------------------------------------------------


def test_to_hf_from_original_loads_in_transformers(original, original_hf):
  _, _, reference = original
  hf_dir = original_hf
  index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  loaded, info = transformers.LlavaForConditionalGeneration.from_pretrained(hf_dir, output_loading_info=True)
  assert not any(info.values()), info  # no missing, unexpected or mismatched keys
  loaded.eval()
  assert (loaded.config.image_token_index, loaded.config.text_config.vocab_size) == (32000, 32064)
  tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
  assert tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001] and tok.pad_token == "<pad>"
  ours, hf_ids, image = sample(REF_IMAGE)
  ref = hf_logits(reference, hf_ids, image)
  got = hf_logits(loaded, np.where(hf_ids == REF_IMAGE, 32000, hf_ids), image)
  assert_fp32_close(got[:, :32000], ref)
  # new rows: llava-hf's N(mean, 1e-5 cov) of the embedding rows
  old = reference.model.language_model.embed_tokens.weight.detach().numpy()
  spread = np.sqrt(1e-5 * np.trace(np.cov(old.T, bias=True)))  # expected |sample - mean|
  for matrix, source in ((loaded.model.language_model.embed_tokens.weight, old),
                         (loaded.lm_head.weight, reference.lm_head.weight.detach().numpy())):
    new = matrix.detach().numpy()
    assert new.shape == (32064, 32)
    np.testing.assert_array_equal(new[:32000], source)
    dist = np.linalg.norm(new[32000:] - old.mean(0), axis=1)
    assert 0.5 * spread < dist.mean() < 1.5 * spread
  # the processor expands '<image>' into the tower's patch count and pads to square (image_aspect_ratio pad)
  processor = transformers.AutoProcessor.from_pretrained(hf_dir)
  from PIL import Image
  batch = processor(text="USER: <image>\nHi ASSISTANT:", images=Image.new("RGB", (40, 20)), return_tensors="np")
  assert (batch["input_ids"] == 32000).sum() == N_IMG and batch["pixel_values"].shape == (1, 3, S, S)
  messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]},
              {"role": "assistant", "content": [{"type": "text", "text": "A"}]},
              {"role": "user", "content": [{"type": "text", "text": "Q2"}]}]
  system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
            "detailed, and polite answers to the user's questions.")
  assert processor.apply_chat_template(messages, add_generation_prompt=True) == (
      f"{system} USER: <image>\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT:")


def _edited_model_folder(folder, dest, edit):
  """A copy of model folder `folder` whose config.json's "model" settings went through `edit(settings)`."""
  shutil.copytree(folder, dest)
  config = json.loads((dest / "config.json").read_text())
  edit(config["model"])
  (dest / "config.json").write_text(json.dumps(config))
  return dest


def test_to_hf_old_style_rope_scaling_and_settings_llava_hf_cannot_hold(original_converted, tmp_path, capsys):
  """{"type": "linear"} (the pre-rope_type key) keeps its factor in transformers; a setting that would not read
  back is an input error naming it, not an assertion."""
  old_style = {"type": "linear", "factor": 2.0}
  src = _edited_model_folder(original_converted, tmp_path / "linear",
                             lambda m: m["text"].update(rope_scaling=old_style))
  code, out = run(["to-hf", src, "--output", tmp_path / "hf"], capsys)
  assert code == 0, out.err
  text = transformers.LlavaConfig.from_pretrained(tmp_path / "hf").text_config
  assert text.rope_parameters["rope_type"] == "linear" and text.rope_parameters["factor"] == 2.0
  inv_freq = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(text).inv_freq.numpy()
  np.testing.assert_allclose(inv_freq, 1 / 5e4 ** (np.arange(0, 8, 2) / 8) / 2, rtol=1e-6)
  src = _edited_model_folder(original_converted, tmp_path / "select", lambda m: m.update(vision_feature_select="x"))
  code, out = run(["to-hf", src, "--output", tmp_path / "hf2"], capsys)
  assert code == 2 and "vision_feature_select: model 'x', llava-hf 'cls_patch'" in out.err, out.err
  assert not (tmp_path / "hf2").exists()


def test_from_hf_to_hf_round_trip_is_exact(llava_hf, tmp_path):
  folder, _ = llava_hf
  assert run(["from-hf", folder, "--output", tmp_path / "m"])[0] == 0
  assert run(["to-hf", tmp_path / "m", "--output", tmp_path / "hf"])[0] == 0
  source = loaders.canonical_tensors(load_file(str(folder / "model.safetensors")), "llava")
  written = load_file(str(tmp_path / "hf" / "model.safetensors"))
  assert any(k.startswith("vision_tower.vision_model.") for k in written)  # the hub's llava-hf names
  written = loaders.canonical_tensors(written, "llava")
  assert source.keys() == written.keys()
  for key in source:
    np.testing.assert_array_equal(written[key], source[key], err_msg=key)
  _, info = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
  assert not any(info.values()), info
  tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
  assert len(tok) == 32002 and tok.convert_tokens_to_ids("<image>") == HF_IMAGE


def test_verify_passes_and_fails(original_converted, original_hf, tmp_path, capsys):
  code, out = run(["verify", original_converted, "--hf", original_hf], capsys)
  assert code == 0 and "OK" in out.out, out.out
  diff = float(out.out.split("max |logit diff| ")[1].split()[0])
  assert diff < 1e-5  # fp32 parity: the logits are below 1 in magnitude
  shutil.copytree(original_hf, tmp_path / "bad")
  index = json.loads((tmp_path / "bad" / "model.safetensors.index.json").read_text())
  shard = tmp_path / "bad" / index["weight_map"]["language_model.model.norm.weight"]
  weights = load_file(str(shard))
  weights["language_model.model.norm.weight"] = weights["language_model.model.norm.weight"] * 1.5
  save_file(weights, str(shard), metadata={"format": "pt"})
  code, out = run(["verify", original_converted, "--hf", tmp_path / "bad"], capsys)
  assert code == 1 and "FAIL" in out.out


def test_cli_in_subprocess(original_converted, original_hf):
  """`python -m llava_jax.convert` as a user runs it."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-m", "llava_jax.convert", "verify", str(original_converted), "--hf",
                         str(original_hf)], capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


# --- errors ----------------------------------------------------------------------------------------------------------


class _RunsCode:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def test_pickle_with_code_is_refused_and_never_runs(original, tmp_path, capsys):
  _, clip, _ = original
  marker = tmp_path / "pwned"
  src = tmp_path / "evil"
  src.mkdir()
  torch.save({"model.embed_tokens.weight": torch.zeros(2), "payload": _RunsCode(marker)}, src / "pytorch_model.bin")
  shutil.copy(original[0] / "config.json", src / "config.json")
  with pytest.raises(checkpoint_io.UnsafeCheckpointError, match="pytorch_model.bin: refused"):
    checkpoint_io.load_torch_file(src / "pytorch_model.bin")
  code, out = run(["from-hf", src, "--output", tmp_path / "out", "--vision", clip], capsys)
  assert code == 2 and "refused" in out.err and "nothing from it was executed" in out.err
  assert not marker.exists() and not (tmp_path / "out").exists()


def _original_safetensors(original, tmp_path, edit):
  folder, _, _ = original
  src = tmp_path / "src"
  src.mkdir()
  shutil.copy(folder / "config.json", src / "config.json")
  state = checkpoint_io.open_state_dict(folder)
  tensors = {k: np.asarray(state[k]) for k in state}
  edit(tensors)
  save_file(tensors, str(src / "model.safetensors"))
  return src


def test_key_errors_listed_in_one_message(original, tmp_path, capsys):
  def edit(t):
    del t["model.layers.1.mlp.up_proj.weight"]
    t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:8]
    t["model.extra_thing.weight"] = np.zeros(3, np.float32)
  src = _original_safetensors(original, tmp_path, edit)
  code, out = run(["from-hf", src, "--output", tmp_path / "out", "--vision", original[1]], capsys)
  assert code == 2
  assert "1 missing, 1 mis-shaped, 1 unexpected" in out.err
  assert "missing: llm.model.layers.1.mlp.up_proj.weight" in out.err
  assert "shape: llm.model.layers.0.self_attn.k_proj.weight: checkpoint (8, 32)" in out.err
  assert "unexpected: llm.model.extra_thing.weight" in out.err
  assert sorted(os.listdir(tmp_path)) == ["src"]  # no output, no temporary folder left


def test_input_errors(original, original_converted, llava_hf, tmp_path, capsys):
  folder, clip, _ = original
  code, out = run(["from-hf", folder, "--output", tmp_path / "a"], capsys)
  assert code == 2 and "give the CLIP folder with --vision" in out.err
  code, out = run(["from-hf", llava_hf[0], "--output", tmp_path / "a", "--vision", clip], capsys)
  assert code == 2 and "--vision is only for the original LLaVA layout" in out.err
  code, out = run(["from-hf", folder, "--output", original_converted, "--vision", clip], capsys)
  assert code == 2 and "already exists" in out.err
  code, out = run(["from-hf", tmp_path / "nope", "--output", tmp_path / "a"], capsys)
  assert code == 2 and "nope: no such folder" in out.err
  empty = tmp_path / "empty"
  empty.mkdir()
  shutil.copy(folder / "config.json", empty / "config.json")
  code, out = run(["from-hf", empty, "--output", tmp_path / "a", "--vision", clip], capsys)
  assert code == 2 and "no weights found" in out.err
  code, out = run(["assemble", "--vision", clip, "--llm", folder, "--output", tmp_path / "a"], capsys)
  assert code == 2 and "expected 'llama'" in out.err
  code, out = run(["to-hf", tmp_path / "nope", "--output", tmp_path / "a"], capsys)
  assert code == 2 and "no such model folder" in out.err
  assert not (tmp_path / "a").exists()


def _edited_copy(folder, dest, edit):
  """`folder` copied to `dest` with its config.json passed through `edit(config)`."""
  shutil.copytree(folder, dest)
  config = json.loads((dest / "config.json").read_text())
  edit(config)
  (dest / "config.json").write_text(json.dumps(config))
  return dest


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 5e4}


def test_settings_the_model_does_not_implement_are_refused(original, llava_hf, parts, tmp_path, capsys):
  """Rope scaling types other than linear / llama3 and an unknown mm_vision_select_feature: exit 2 at conversion,
  naming the field and value, instead of a model folder whose first forward pass fails."""
  folder, clip, _ = original
  src = _edited_copy(folder, tmp_path / "yarn", lambda c: c.update(rope_parameters=YARN))
  code, out = run(["from-hf", src, "--output", tmp_path / "a", "--vision", clip], capsys)
  assert code == 2 and "rope_scaling" in out.err and "'yarn'" in out.err and "linear, llama3" in out.err, out.err
  dynamic = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 5e4}
  src = _edited_copy(llava_hf[0], tmp_path / "dynamic", lambda c: c["text_config"].update(rope_parameters=dynamic))
  code, out = run(["from-hf", src, "--output", tmp_path / "a"], capsys)
  assert code == 2 and "'dynamic'" in out.err and "linear, llama3" in out.err, out.err
  llm = _edited_copy(parts[2], tmp_path / "llm", lambda c: c.update(rope_parameters=YARN))
  code, out = run(["assemble", "--vision", parts[0], "--llm", llm, "--output", tmp_path / "a"], capsys)
  assert code == 2 and "llm/config.json: rope_scaling" in out.err and "'yarn'" in out.err, out.err
  src = _edited_copy(folder, tmp_path / "full", lambda c: c.update(mm_vision_select_feature="full"))
  code, out = run(["from-hf", src, "--output", tmp_path / "a", "--vision", clip], capsys)
  assert code == 2 and "mm_vision_select_feature 'full' is not supported (patch | cls_patch)" in out.err, out.err
  assert not (tmp_path / "a").exists()


def test_to_hf_refuses_projectors_llava_hf_cannot_hold(parts, tmp_path, capsys):
  clip_dir, _, llm_dir, _ = parts
  assert run(["assemble", "--vision", clip_dir, "--llm", llm_dir, "--projector-type", "linear", "--output",
              tmp_path / "m"])[0] == 0
  code, out = run(["to-hf", tmp_path / "m", "--output", tmp_path / "hf"], capsys)
  assert code == 2 and "mlp2x_gelu" in out.err and not (tmp_path / "hf").exists()
