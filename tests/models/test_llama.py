"""LLaMA decoder against transformers' LlamaForCausalLM (tiny random configs, fp32)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from llava_jax.models import loaders
from llava_jax.models.config import RuntimeConfig, TextConfig
from llava_jax.models.llama import KVCache, LlamaModel
from tests.parity import assert_fp32_close

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}

CASES = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "theta": dict(num_key_value_heads=2, rope_theta=500000.0),
    "llama3": dict(num_key_value_heads=1, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING),
    "linear_scaling": dict(num_key_value_heads=4, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
}


def _hf_llama(seed=0, **kw):
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-6,
                                 **kw)
  return transformers.LlamaForCausalLM(cfg).eval()


def _ours(hf, **runtime):
  model = LlamaModel(TextConfig.from_hf(hf.config), RuntimeConfig(**runtime), rngs=nnx.Rngs(0))
  nnx.update(model, loaders.load_llama_state_dict(model, hf.state_dict()))
  return model


def _hf_logits(hf, ids, mask=None):
  with torch.no_grad():
    out = hf(input_ids=torch.from_numpy(ids), attention_mask=None if mask is None else torch.from_numpy(mask))
  return out.logits.numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match(case):
  hf = _hf_llama(**CASES[case])
  if case == "llama3":  # the scaling must actually be in force in the reference.
    assert hf.config.rope_parameters["rope_type"] == "llama3"
  ours = _ours(hf)
  ids = np.random.RandomState(0).randint(0, 97, (2, 40)).astype(np.int64)
  assert_fp32_close(ours(jnp.asarray(ids)), _hf_logits(hf, ids))


def test_config_reads_rope_settings():
  cfg = TextConfig.from_hf(_hf_llama(**CASES["llama3"]).config)
  assert cfg.rope_theta == 500000.0
  assert cfg.rope_scaling_dict["rope_type"] == "llama3" and cfg.rope_scaling_dict["factor"] == 8.0
  assert TextConfig.from_hf(_hf_llama().config).rope_scaling is None


@pytest.mark.parametrize("scan", [True, False])
def test_right_padded_batch(scan):
  hf = _hf_llama(**CASES["gqa"])
  ours = _ours(hf, scan_layers=scan)
  rng = np.random.RandomState(1)
  ids = rng.randint(3, 97, (3, 24)).astype(np.int64)
  mask = np.ones_like(ids)
  mask[1, 15:] = 0
  mask[2, 5:] = 0
  ref = _hf_logits(hf, ids, mask)
  # Training path: causal attention only, no padding mask (right padding never reaches real tokens).
  got = np.asarray(ours(jnp.asarray(ids)))
  got_masked = np.asarray(ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask, bool)))
  for b in range(3):
    n = mask[b].sum()
    assert_fp32_close(got[b, :n], ref[b, :n])
    assert_fp32_close(got_masked[b, :n], ref[b, :n])


def test_left_padded_batch():
  hf = _hf_llama(**CASES["mha"])
  ours = _ours(hf)
  ids = np.random.RandomState(2).randint(3, 97, (2, 20)).astype(np.int64)
  mask = np.ones_like(ids)
  mask[0, :7] = 0
  ref = _hf_logits(hf, ids, mask)
  got = np.asarray(ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask, bool)))
  assert_fp32_close(got[0, 7:], ref[0, 7:])
  assert_fp32_close(got[1], ref[1])


@pytest.mark.parametrize("case", ["gqa", "llama3"])
def test_kv_cache_prefill_then_decode_equals_full_forward(case):
  hf = _hf_llama(**CASES[case])
  ours = _ours(hf)
  rng = np.random.RandomState(3)
  ids = rng.randint(3, 97, (2, 16)).astype(np.int32)
  mask = np.ones_like(ids, dtype=bool)
  mask[1, :4] = False  # left padding on row 1
  prompt_len, cache_len = 10, 24
  full = np.asarray(ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))

  positions = jnp.maximum(jnp.cumsum(jnp.asarray(mask, jnp.int32), axis=1) - 1, 0)
  kv_mask = jnp.zeros((2, cache_len), bool).at[:, :16].set(jnp.asarray(mask))
  cache = KVCache.zeros(ours.cfg, 2, cache_len, jnp.float32)

  @jax.jit
  def step(model_state, x_ids, pos, cache, index):
    model = nnx.merge(graphdef, model_state)
    hidden, cache = model.decode(model.embed(x_ids), pos, kv_mask=kv_mask, cache=cache, cache_index=index)
    return model.logits(hidden), cache

  graphdef, model_state = nnx.split(ours)
  logits, cache = step(model_state, ids[:, :prompt_len], positions[:, :prompt_len], cache, 0)
  outs = [np.asarray(logits)]
  for t in range(prompt_len, 16):
    logits, cache = step(model_state, ids[:, t:t + 1], positions[:, t:t + 1], cache, t)
    outs.append(np.asarray(logits))
  incremental = np.concatenate(outs, axis=1)
  assert_fp32_close(incremental[0], full[0])
  assert_fp32_close(incremental[1, 4:], full[1, 4:])


def test_recompute_elementwise_same_gradients_fewer_saved_values():
  """RMSNorm and the SwiGLU product recomputed in the backward pass: the same loss and gradients, and no
  float32 [B, T, D] value saved for the backward pass (bf16 model)."""
  from jax._src import ad_checkpoint  # pylint: disable=g-import-not-at-top  (saved_residuals is not public)
  cfg = TextConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)
  ids = jax.random.randint(jax.random.key(1), (2, 16), 0, 97)

  def loss_and_saved(lean, dtype):
    runtime = RuntimeConfig(param_dtype=dtype, dtype=dtype, attention_impl="xla", recompute_elementwise=lean)
    graphdef, params = nnx.split(LlamaModel(cfg, runtime, rngs=nnx.Rngs(0)))
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(ids).astype(jnp.float32) ** 2)
    saved = ad_checkpoint.saved_residuals(loss, params)
    return jax.value_and_grad(loss)(params), [aval for aval, _ in saved]

  (loss_a, grads_a), _ = loss_and_saved(False, "float32")
  (loss_b, grads_b), _ = loss_and_saved(True, "float32")
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7), grads_a, grads_b)

  big_f32 = lambda avals: [a for a in avals if a.dtype == jnp.float32 and a.shape[-1] in (32, 48) and a.ndim == 3]
  _, saved_plain = loss_and_saved(False, "bfloat16")
  _, saved_lean = loss_and_saved(True, "bfloat16")
  assert big_f32(saved_plain), "the plain RMSNorm should save its float32 input"
  assert not big_f32(saved_lean), [a.str_short() for a in big_f32(saved_lean)]
  assert sum(a.size * a.dtype.itemsize for a in saved_lean) < sum(a.size * a.dtype.itemsize for a in saved_plain)
