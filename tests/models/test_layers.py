"""Tests of llava_jax.models.layers that need no reference model: the choice of attention implementation."""
import jax
import pytest

from llava_jax.models import layers
from llava_jax.models.config import RuntimeConfig


@pytest.mark.parametrize("backend,dtype,expected", [
    ("gpu", "bfloat16", "cudnn"), ("gpu", "float16", "cudnn"),
    ("gpu", "float32", "xla"),  # cuDNN's fused attention rejects float32 (e.g. `convert verify`, fp32 eval)
    ("cpu", "bfloat16", "xla"), ("tpu", "bfloat16", "xla")])
def test_attention_implementation_by_backend_and_dtype(monkeypatch, backend, dtype, expected):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  assert layers.attention_implementation(RuntimeConfig(dtype=dtype, param_dtype="float32")) == expected
  named = RuntimeConfig(dtype=dtype, param_dtype="float32", attention_impl="xla")
  assert layers.attention_implementation(named) == "xla"  # a named implementation is kept
