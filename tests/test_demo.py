"""The demo's own pieces: the tokenizer corpus and stage 1's starting model folder."""
import json

import numpy as np
import pytest
from flax import nnx, traverse_util as tu

from configs import demo as demo_config
from llava_jax import demo, model_folder
from llava_jax.data import demo as demo_data
from llava_jax.data import templates
from llava_jax.models.llava import LlavaModel


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
  root = tmp_path_factory.mktemp("demo_pieces")
  paths = demo_data.write_demo_dataset(root / "data", num_stage1=20, num_stage2=30, num_heldout=5)
  files = {paths["stage1"]: "plain", paths["stage2"]: "vicuna_v1"}
  tok_dir = demo.build_tokenizer(demo._corpus(files), str(root / "tok"), 1000)
  return root, paths, files, tok_dir


def test_corpus_is_the_rendered_training_prompts(small_demo):
  _, paths, files, _ = small_demo
  corpus = demo._corpus(files)
  records = {p: json.load(open(p)) for p in files}
  system = templates.get_template("vicuna_v1").system
  assert system and sum(text.count(system) for text in corpus) == len(records[paths["stage2"]])
  assert not any(templates.IMAGE_TAG in text for text in corpus)
  first_caption = records[paths["stage1"]][0]["conversations"][1]["value"]
  assert any(first_caption in text for text in corpus)


def test_tokenizer_learns_the_system_prompt(small_demo):
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(small_demo[3])
  system = templates.get_template("vicuna_v1").system
  # Every word of the system message is frequent in the corpus, so it is one token (no byte/letter pieces).
  assert len(tok(system, add_special_tokens=False).input_ids) == len(system.split())


def test_init_model_changes_only_the_position_embedding_scale(small_demo, tmp_path):
  tok_dir = small_demo[3]
  model_cfg = demo_config.get_config().stage1.model
  out = demo.write_init_model(model_cfg, tok_dir, 512, str(tmp_path / "init"), seed=3, position_std=0.5)
  saved = model_folder.load_numpy_params(out)
  cfg = model_folder.load_config(out)
  assert cfg.text.vocab_size == 512 and cfg.vision.image_size == model_cfg.vision.image_size
  reference = nnx.state(LlavaModel(cfg, rngs=nnx.Rngs(3)), nnx.Param).to_pure_dict()
  position = saved["vision_tower"].pop("position_embedding")
  np.testing.assert_allclose(position, np.asarray(reference["vision_tower"].pop("position_embedding")) * 25,
                             rtol=1e-6)
  assert 0.4 < position.std() < 0.6

  str_keys = lambda tree: {tuple(map(str, k)): v for k, v in tu.flatten_dict(tree).items()}
  saved_flat, ref_flat = str_keys(saved), str_keys(reference)
  assert saved_flat.keys() == ref_flat.keys()
  for key, value in ref_flat.items():
    np.testing.assert_array_equal(saved_flat[key], np.asarray(value), err_msg=str(key))
  assert model_folder.load_tokenizer(out) is not None
