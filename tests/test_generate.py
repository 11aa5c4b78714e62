"""Generation against transformers: greedy tokens equal `LlavaForConditionalGeneration.generate` (fp32, left
padding); sampling filters equal transformers' warpers; stop strings, EOS, streaming and bucketing."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from llava_jax import generate
from llava_jax import generate_testing as testing
from llava_jax import model_folder
from llava_jax import sharding
from llava_jax.convert import to_hf
from llava_jax.generate_testing import IMAGE_SIZE, hf_greedy, random_image, tiny_hf_llava
from llava_jax.models import config as model_config
from llava_jax.models.config import IMAGE_TOKEN_INDEX


def mixed_requests(seed=0):
  """One image, two images (text between them), text only: different lengths before and after expansion."""
  rng = np.random.RandomState(seed)
  text = lambda n: list(rng.randint(3, 90, n))
  image = lambda n: rng.randn(n, IMAGE_SIZE, IMAGE_SIZE, 3).astype(np.float32)
  return [
      generate.Request(np.array([1, IMAGE_TOKEN_INDEX] + text(7), np.int32), image(1)),
      generate.Request(np.array([1] + text(3) + [IMAGE_TOKEN_INDEX] + text(2) + [IMAGE_TOKEN_INDEX] + text(9),
                                np.int32), image(2)),
      generate.Request(np.array([1] + text(5), np.int32), None),
  ]


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory, llama_tokenizer_dir):
  """A tiny random llava-hf model (GQA) and its model folder."""
  hf = tiny_hf_llava()
  return hf, testing.convert_to_folder(hf, tmp_path_factory.mktemp("small"), llama_tokenizer_dir)


@pytest.fixture(scope="module")
def small(small_folder):
  """The tiny llava-hf model and an engine on it, through from-hf and the model folder."""
  hf, path = small_folder
  return hf, generate.Engine(model_folder.load_model(path))


@pytest.mark.parametrize("rows", [[0, 1, 2], [1]], ids=["batch", "single"])
def test_greedy_matches_transformers(small, rows):
  hf, engine = small
  requests = [mixed_requests()[i] for i in rows]
  got = engine.generate_ids(requests, generate.SamplingParams(max_new_tokens=12))
  assert got == hf_greedy(hf, requests, 12)
  assert all(len(g) == 12 or g[-1] in engine.eos_token_ids for g in got)


def test_eos_ends_a_row_and_batch_rows_are_independent(small):
  hf, engine = small
  requests = mixed_requests()
  free = engine.generate_ids(requests, generate.SamplingParams(max_new_tokens=10))
  # make row 0's 4th token the end token: row 0 stops there, the other rows go on as before until they meet it
  eos = free[0][3]
  compiled = generate._prefill._cache_size(), generate._decode._cache_size()
  stopping = generate.Engine(nnx.merge(engine.graphdef, engine.state), eos_token_id=eos)
  got = stopping.generate_ids(requests, generate.SamplingParams(max_new_tokens=10))
  # an engine of an equal model shares the compiled programs
  assert (generate._prefill._cache_size(), generate._decode._cache_size()) == compiled
  for row, ids in zip(free, got):
    assert ids == (row[:row.index(eos) + 1] if eos in row else row)
  assert got[0] == free[0][:4]
  # the same on the device from SamplingParams.stop_token_ids, and from a list of EOS ids
  unused = next(i for i in range(100) if not any(i in row for row in free))
  by_stop_id = engine.generate_ids(requests, generate.SamplingParams(max_new_tokens=10, stop_token_ids=(eos,)))
  by_eos_list = generate.Engine(nnx.merge(engine.graphdef, engine.state), eos_token_id=[unused, eos]
                                ).generate_ids(requests, generate.SamplingParams(max_new_tokens=10))
  assert by_stop_id == by_eos_list == got
  # ignore_eos: no id ends a row, not even one sampled first (the prefill's token)
  first = free[0][0]
  ignoring = generate.Engine(nnx.merge(engine.graphdef, engine.state), eos_token_id=first).generate_ids(
      requests, generate.SamplingParams(max_new_tokens=10, ignore_eos=True, stop_token_ids=(free[1][0],)))
  assert all(len(row) == 10 for row in ignoring)
  assert [row[:len(f)] for row, f in zip(ignoring, free)] == free


def test_eos_lists_are_kept_from_the_hf_config():
  """Llama-3-Instruct's generation config ends on <|end_of_text|> and <|eot_id|>: both ids end generation, and
  the list survives the model folder's JSON."""
  hf = transformers.LlamaConfig(eos_token_id=[128001, 128009])
  text = model_config.TextConfig.from_hf(hf)
  assert text.eos_token_ids == (128001, 128009)
  cfg = model_config.ModelConfig(text=text)
  assert model_config.ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  assert model_config.TextConfig(eos_token_id=[7]).eos_token_ids == (7,)
  small = model_config.ModelConfig(
      text=model_config.TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=4, eos_token_id=[2, 7]),
      vision=model_config.VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, image_size=28))
  exported = to_hf.hf_config(small, to_hf.VocabPlan(None, 60, 0, 64), np.dtype("float32"))  # checks read-back
  assert json.loads(exported.to_json_string())["text_config"]["eos_token_id"] == [2, 7]
  with pytest.raises(ValueError, match="empty"):
    model_config.TextConfig(eos_token_id=[])


def test_one_compile_per_bucket(small):
  """Prompts of different lengths in one bucket (and any max_new_tokens in one bucket) reuse one program."""
  _, engine = small
  rng = np.random.RandomState(1)
  image = lambda n: rng.randn(n, IMAGE_SIZE, IMAGE_SIZE, 3).astype(np.float32)
  sizes = lambda: (generate._prefill._cache_size(), generate._decode._cache_size())
  before = sizes()
  for n, new in [(8, 12), (10, 7), (13, 16)]:  # 11..16 ids (T bucket 16), 17..22 positions (L bucket 32)
    ids = np.array([1, IMAGE_TOKEN_INDEX] + list(rng.randint(3, 90, n)) + [IMAGE_TOKEN_INDEX], np.int32)
    engine.generate_ids([generate.Request(ids, image(2))], generate.SamplingParams(max_new_tokens=new))
  after = sizes()
  assert after[0] - before[0] <= 1 and after[1] - before[1] <= 1


def test_bucket_sizes():
  assert [generate.bucket(n) for n in (1, 16, 17, 33, 256, 257, 616, 1024, 1025)] == [
      16, 16, 32, 48, 256, 288, 640, 1024, 1152]
  for n in range(1, 3000):
    b = generate.bucket(n)
    assert n <= b <= max(n + 15, n * 1.125)
  assert [generate.batch_bucket(n) for n in (1, 2, 3, 5, 16)] == [1, 2, 4, 8, 16]


def test_request_errors(small):
  _, engine = small
  ids = np.array([1, IMAGE_TOKEN_INDEX, 5], np.int32)
  with pytest.raises(ValueError, match="request 0: 1 image placeholders but 0 images"):
    engine.prepare([generate.Request(ids)], 4)
  with pytest.raises(ValueError, match=r"request 0: images must be \[n, 28, 28, 3\]"):
    engine.prepare([generate.Request(ids, np.zeros((1, 30, 30, 3), np.float32))], 4)
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate.SamplingParams(max_new_tokens=0)


# --- sampling ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature,top_p", [(1.0, 0.9), (0.7, 0.5), (1.5, 0.95), (1.0, 1.0), (0.3, 0.01)])
def test_filter_logits_matches_transformers_warpers(temperature, top_p):
  logits = np.random.RandomState(0).randn(8, 50).astype(np.float32) * 3
  scores = torch.from_numpy(logits)
  scores = transformers.TemperatureLogitsWarper(temperature)(None, scores)
  if top_p < 1.0:
    scores = transformers.TopPLogitsWarper(top_p)(None, scores)
  got = np.asarray(generate.filter_logits(jnp.asarray(logits), jnp.float32(temperature), jnp.float32(top_p)))
  np.testing.assert_array_equal(np.isinf(got), np.isinf(scores.numpy()))
  finite = ~np.isinf(got)
  np.testing.assert_allclose(got[finite], scores.numpy()[finite], rtol=1e-6)


def test_sample_frequencies_follow_temperature():
  """Empirical token frequencies match softmax(logits / T) (to 5 binomial standard deviations); a lower
  temperature concentrates the mass on the top token."""
  logits = jnp.array([2.0, 1.0, 0.5, -1.0])
  n = 20000
  top_share = {}
  for temperature in (0.5, 2.0):
    tokens = generate.sample_logits(jnp.broadcast_to(logits, (n, 4)), jax.random.key(0), jnp.float32(temperature),
                                    jnp.float32(1.0), greedy=False)
    freq = np.bincount(np.asarray(tokens), minlength=4) / n
    p = np.exp(np.asarray(logits) / temperature)
    p /= p.sum()
    np.testing.assert_array_less(np.abs(freq - p), 5 * np.sqrt(p * (1 - p) / n) + 1e-9)
    top_share[temperature] = freq[0]
  assert top_share[0.5] > top_share[2.0] + 0.2


def test_sampled_generation_seeded(small):
  _, engine = small
  requests = mixed_requests()
  run = lambda **kw: engine.generate_ids(requests, generate.SamplingParams(max_new_tokens=12, **kw))
  greedy = run()
  hot = run(temperature=1.5, seed=3)
  assert hot == run(temperature=1.5, seed=3)
  assert hot != run(temperature=1.5, seed=4)
  assert hot != greedy
  assert run(temperature=1.5, top_p=1e-6, seed=5) == greedy  # nucleus of the top token only


# --- text: template, tokenizer, stop strings, streaming -----------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, llama_tokenizer_dir):
  """A model folder (from-hf) with the LLaMA vocabulary (+ llava-hf's '<image>' at 32000) and the real tokenizer,
  and the transformers model it came from."""
  return testing.tokenizer_model_folder(tmp_path_factory.mktemp("tok"), llama_tokenizer_dir)


@pytest.fixture(scope="module")
def with_tokenizer(model_dir):
  hf, path = model_dir
  return hf, generate.Generator.from_folder(str(path))


def test_prompt_from_template_and_image_matches_transformers(with_tokenizer):
  hf, gen = with_tokenizer
  request = gen.question("What is in the image?", [random_image(0)])
  # LLaVA's tokenizer_image_token: chunks around '<image>' tokenised apart, BOS only on the first
  prompt = gen.template.build_prompt([("human", "<image>\nWhat is in the image?")], add_generation_prompt=True)
  assert prompt.startswith("A chat between") and prompt.endswith("USER: <image>\nWhat is in the image? ASSISTANT:")
  head, tail = prompt.split("<image>")
  expected = gen.tokenizer(head).input_ids + [IMAGE_TOKEN_INDEX] + gen.tokenizer(tail).input_ids[1:]
  assert list(request.input_ids) == expected
  assert request.images.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
  got = gen.engine.generate_ids([request], generate.SamplingParams(max_new_tokens=16))
  assert got == hf_greedy(hf, [request], 16)
  out = gen.generate([request], gen.params(max_new_tokens=16))[0]
  assert out.token_ids == [t for t in got[0] if t not in gen.engine.eos_token_ids]
  assert out.text == gen.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_stop_strings_cut_text_and_end_generation(with_tokenizer):
  _, gen = with_tokenizer
  request = gen.question("Tell me a story.", [random_image(1)])
  free = gen.generate([request], generate.SamplingParams(max_new_tokens=16))[0]
  assert free.finish_reason == "length" and len(free.token_ids) == 16
  m = len(gen.decode(free.token_ids[:8]))
  stop = free.text[m:m + 3]  # text of the 9th token onwards
  assert len(stop) == 3
  expected_text = free.text[:free.text.find(stop)]
  assert expected_text
  for chunk in (1, 4, 16):
    out = gen.generate([request], generate.SamplingParams(max_new_tokens=16, stop_strings=(stop,),
                                                          chunk_size=chunk))[0]
    assert out.finish_reason == "stop"
    assert out.text == expected_text
    assert out.token_ids == free.token_ids[:len(out.token_ids)]
    assert stop in gen.decode(out.token_ids) and stop not in gen.decode(out.token_ids[:-1])


def test_stream_pieces_join_to_the_generated_text(with_tokenizer):
  _, gen = with_tokenizer
  request = gen.question("Describe the weather today.", [random_image(2)])  # same buckets as above
  params = generate.SamplingParams(max_new_tokens=16)
  pieces = list(gen.stream(request, params))
  assert "".join(pieces) == gen.generate([request], params)[0].text
  assert len(pieces) > 3


def test_hold_back_keeps_possible_stop_prefixes():
  assert generate._hold_back("hello </", ("</s>",)) == "hello "
  assert generate._hold_back("hello <", ("</s>", "<|im_end|>")) == "hello "
  assert generate._hold_back("hello", ("</s>",)) == "hello"
  assert generate._hold_back("caf\ufffd", ()) == "caf"


@pytest.mark.parametrize("decode_attention", ["xla", "pallas"])
def test_cli_prints_only_the_answer(with_tokenizer, model_dir, tmp_path, capsys, decode_attention):
  _, gen = with_tokenizer
  _, path = model_dir
  image = tmp_path / "image.png"
  random_image(3).save(image)
  argv = ["--model", str(path), "--image", str(image), "--prompt", "What is in the image?", "--max-new-tokens", "16",
          "--decode-attention", decode_attention]
  assert generate.main(argv) == 0
  expected = gen.generate([gen.question("What is in the image?", [str(image)])], gen.params(max_new_tokens=16))[0]
  assert expected.text.strip()
  assert capsys.readouterr().out == expected.text.strip() + "\n"


def test_special_token_stop_strings_end_rows_by_id(model_dir):
  """ChatML's '<|im_end|>' as one special token: matching stop strings against text decoded without special
  tokens would never find it, so it becomes a stop token id (the device ends the row; the output is cut before
  it, reason 'stop'); a stop string the tokenizer has no token for stays a string."""
  _, path = model_dir
  gen = generate.Generator.from_folder(str(path), template="chatml_direct")
  assert gen.stop_strings == ("<|im_end|>",)
  assert gen.params().stop_token_ids == () and gen.params().stop_strings == ("<|im_end|>",)  # not a token here
  gen.tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
  end = gen.tokenizer.convert_tokens_to_ids("<|im_end|>")
  params = gen.params(max_new_tokens=8, stop_strings=("END",))
  assert params.stop_strings == ("END",) and params.stop_token_ids == (end,)
  hello = gen.tokenizer("Hello there", add_special_tokens=False).input_ids
  out = gen._finish(np.array(hello + [end] + hello), params)
  assert out == generate.Output(hello, "Hello there", "stop")
  assert gen._finish(np.array(hello + [end]), generate.SamplingParams(max_new_tokens=8)).finish_reason == "length"


def test_template_stop_strings(with_tokenizer, model_dir):
  _, gen = with_tokenizer
  assert gen.stop_strings == ()  # Vicuna's '</s>' is the EOS token: ended on the device
  plain = generate.Generator.from_folder(str(model_dir[1]), template="plain")
  assert plain.stop_strings == ("\n",)
  assert plain.params(stop_strings=("END",)).stop_strings == ("END", "\n")
  ids = plain.question("ignored by plain", [random_image(0)]).input_ids
  assert list(ids) == [1, IMAGE_TOKEN_INDEX]  # LLaVA's stage-1 prompt: BOS and the image


def test_fused_projections_same_tokens_and_hidden_states(small_folder, small):
  """The engine's fused q/k/v and gate/up matmuls compute what the separate ones do (GQA model, fp32)."""
  _, path = small_folder
  _, engine = small
  fused = nnx.merge(engine.graphdef, engine.state)
  layer = fused.language_model.layers[0]
  assert hasattr(layer.self_attn, "qkv_proj") and not hasattr(layer.self_attn, "q_proj")
  assert hasattr(layer.mlp, "gate_up_proj") and not hasattr(layer.mlp, "gate_proj")
  separate = generate.unstack_layers(model_folder.load_model(path), fuse=False)
  assert hasattr(separate.language_model.layers[0].self_attn, "q_proj")
  lm_fused, lm_separate = fused.language_model, separate.language_model
  x = jax.random.normal(jax.random.key(0), (2, 5, lm_fused.cfg.hidden_size))
  positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
  kv_mask = jnp.ones((2, 8), bool)
  shape = (2, lm_fused.cfg.num_key_value_heads, 8, lm_fused.cfg.head_size)
  caches = tuple((jnp.zeros(shape), jnp.zeros(shape)) for _ in lm_fused.layers)
  (h_fused, kv_fused), (h_sep, kv_sep) = (generate.run_layers(lm, x, positions, kv_mask, caches, 0)
                                          for lm in (lm_fused, lm_separate))
  np.testing.assert_allclose(h_fused, h_sep, rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), kv_fused, kv_sep)
  requests = mixed_requests()
  params = generate.SamplingParams(max_new_tokens=8)
  assert (generate.Engine(separate, fuse_projections=False).generate_ids(requests, params)
          == engine.generate_ids(requests, params))


def test_flash_decoding_kernel_matches_transformers(small_folder):
  """decode_attention='pallas' (JAX's flash-decoding kernel, interpreted on CPU) over left-padded rows of
  different lengths: the tokens of transformers' greedy generate."""
  hf, path = small_folder
  engine = generate.Engine(model_folder.load_model(path), decode_attention="pallas")
  requests = mixed_requests()
  assert engine.generate_ids(requests, generate.SamplingParams(max_new_tokens=12)) == hf_greedy(hf, requests, 12)


def test_decode_attention_settings_are_checked(small_folder, small):
  _, engine = small
  with pytest.raises(ValueError, match="'xla' or 'pallas'"):
    engine.set_decode_attention("flash")
  with pytest.raises(ValueError, match="power of two"):
    engine.set_decode_attention("pallas", k_splits=3)
  assert engine.decode_attention == "xla"
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 1}, jax.devices()[:2])
  with pytest.raises(ValueError, match="runs on one device; the model is on 2"):
    generate.Engine(model_folder.load_model(small_folder[1], mesh=mesh), decode_attention="pallas")


def test_projections_sharded_on_their_output_axis_are_not_fused(small_folder):
  _, path = small_folder
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 2}, jax.devices()[:2])
  layer = generate.unstack_layers(model_folder.load_model(path, mesh=mesh)).language_model.layers[0]
  assert hasattr(layer.self_attn, "q_proj") and not hasattr(layer.self_attn, "qkv_proj")
  assert hasattr(layer.mlp, "gate_proj") and not hasattr(layer.mlp, "gate_up_proj")
  replicated = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 1}, jax.devices()[:2])
  layer = generate.unstack_layers(model_folder.load_model(path, mesh=replicated)).language_model.layers[0]
  assert hasattr(layer.self_attn, "qkv_proj") and hasattr(layer.mlp, "gate_up_proj")
