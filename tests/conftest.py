"""Test set-up: 8 fake CPU devices (before jax is imported), fp32 matmuls, shared fixtures."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

ASSETS = pathlib.Path(__file__).parent.parent / "llava_jax" / "assets"
LLAMA_TOKENIZER_DIR = ASSETS / "llama_tokenizer"


@pytest.fixture(scope="session")
def llama_tokenizer_dir():
  """Folder of the real LLaMA/Vicuna-v1.5 tokenizer (see llava_jax/assets/llama_tokenizer/SOURCE.md)."""
  return LLAMA_TOKENIZER_DIR


@pytest.fixture(autouse=True, scope="session")
def _absl_flags_parsed():
  """grain and absl-using code read flags; tests have no command line."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
