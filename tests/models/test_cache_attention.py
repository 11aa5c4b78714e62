"""Attention over the head-major KV cache: `attend` against `jax.nn.dot_product_attention` on the [B, S, K, H]
layout, and the flash-decoding kernel (`attend_window`, interpreted on CPU) against `attend` with the mask of
the same window (fp32)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llava_jax.models import cache_attention


def _qkv(b, t, n, kv, s, h, seed=0):
  kq, kk, kv_ = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (b, t, n, h), jnp.float32)
  k = jax.random.normal(kk, (b, kv, s, h), jnp.float32)
  v = jax.random.normal(kv_, (b, kv, s, h), jnp.float32)
  return q, k, v


@pytest.mark.parametrize("n,kv", [(4, 4), (8, 2)], ids=["mha", "gqa"])
def test_attend_equals_dot_product_attention(n, kv):
  q, k, v = _qkv(2, 5, n, kv, 24, 16)
  rng = np.random.RandomState(0)
  mask = jnp.asarray(rng.rand(2, 1, 5, 24) < 0.6).at[..., 0].set(True)
  want = jax.nn.dot_product_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask=mask,
                                      implementation="xla")
  np.testing.assert_allclose(cache_attention.attend(q, k, v, mask), want, rtol=1e-5, atol=1e-6)


def test_write_puts_new_tokens_at_their_slots():
  cache = jnp.zeros((2, 3, 10, 4), jnp.bfloat16)
  new = jax.random.normal(jax.random.key(1), (2, 2, 3, 4))  # [B, T, K, H]
  got = cache_attention.write(cache, new, 6)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(got[:, :, 6:8], jnp.swapaxes(new, 1, 2).astype(jnp.bfloat16))
  assert not np.asarray(got[:, :, :6]).any() and not np.asarray(got[:, :, 8:]).any()


def _window_mask(start, stop, s):
  slots = jnp.arange(s)
  return ((slots >= start[:, None]) & (slots < stop))[:, None, None, :]  # [B, 1, 1, S]


@pytest.mark.parametrize("n,kv,k_splits", [(4, 4, 1), (4, 4, 4), (8, 2, 2), (32, 2, None)],
                         ids=["mha-1", "mha-4", "gqa-2", "gqa16-default"])
def test_window_kernel_equals_masked_attention(n, kv, k_splits):
  s = 64
  q, k, v = _qkv(3, 1, n, kv, s, 16, seed=2)
  start = jnp.asarray([0, 5, 37], jnp.int32)  # the last row's window starts in the kernel's third part
  for stop in (38, 50, s):  # windows ending inside a block, at a block boundary, at the end of the cache
    window = cache_attention.SlotWindow(start, jnp.asarray(stop, jnp.int32), k_splits)
    got = cache_attention.attend_window(q, k, v, window)
    want = cache_attention.attend(q, k, v, _window_mask(start, stop, s))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"stop={stop}")


def test_window_of_engine_mask():
  kv_mask = jnp.asarray([[False, False, True, True, True, True], [True] * 6])
  window = cache_attention.window_of(kv_mask, jnp.int32(3))
  np.testing.assert_array_equal(window.start, [2, 0])
  assert int(window.stop) == 4


def test_window_kernel_shape_errors():
  q, k, v = _qkv(1, 1, 2, 2, 48, 8)
  window = cache_attention.SlotWindow(jnp.zeros((1,), jnp.int32), jnp.int32(10), 2)
  with pytest.raises(ValueError, match="one new token per row"):
    cache_attention.attend_window(jnp.concatenate([q, q], axis=1), k, v, window._replace(k_splits=1))
  with pytest.raises(ValueError, match="multiple of 16"):
    cache_attention.attend_window(q, k[:, :, :40], v[:, :, :40], window._replace(k_splits=1))


def test_k_splits_is_a_most_that_fits_the_cache():
  """48 slots cannot be cut in 2 parts of multiples of 16: k_splits=2 (and 4) runs as 1 part, still exact."""
  q, k, v = _qkv(2, 1, 2, 2, 48, 8, seed=3)
  start = jnp.asarray([0, 3], jnp.int32)
  want = cache_attention.attend(q, k, v, _window_mask(start, 40, 48))
  for k_splits in (2, 4):
    got = cache_attention.attend_window(q, k, v, cache_attention.SlotWindow(start, jnp.int32(40), k_splits))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert cache_attention._fitting_splits(16, 64) == 4 and cache_attention._fitting_splits(3, 768) == 2


def test_default_splits_divide_the_cache():
  for programs in (1, 4, 32, 512):
    for s in (16, 48, 640, 768, 1024):
      splits = cache_attention.default_splits(programs, s)
      assert 1 <= splits <= 16 and s % (16 * splits) == 0
  assert cache_attention.default_splits(4096, 1024) == 1  # enough programs without splitting


def test_kernel_runs_interpreted_on_cpu_and_not_on_tpu(monkeypatch):
  assert cache_attention.kernel_interpreted()  # these tests run on CPU
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  with pytest.raises(ValueError, match="written for GPUs .* on tpu use 'xla'"):
    cache_attention.kernel_interpreted()
