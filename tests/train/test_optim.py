"""The optimizer's weight-decay mask against transformers' Trainer rule on the same LLaVA."""
import jax
import ml_collections
import numpy as np
import transformers
from flax import nnx

from llava_jax import model_folder
from llava_jax.models import loaders
from llava_jax.models.config import ModelConfig
from llava_jax.train import optim
from tests.models.test_llava import hf_llava


def test_weight_decay_skips_biases_and_norms_as_transformers_trainer():
  hf = hf_llava(layers=2)
  # transformers' rule on the llava-hf model (LLaVA's trainer uses it), keyed by the converter's canonical names
  decayed = set(transformers.Trainer.get_decay_parameter_names(None, hf))
  want = {loaders.canonical_key(n, "llava"): n in decayed for n, _ in hf.named_parameters()}
  assert not all(want.values()) and any(want.values())

  model = model_folder.abstract_model(ModelConfig.from_hf_llava(hf.config))
  parts = ("vision_tower", "projector", "language_model")  # every kind of parameter trainable
  _, trainable, _ = nnx.split(model, optim.trainable_filter(parts), ...)
  cfg = ml_collections.ConfigDict(dict(learning_rate=1.0, warmup_ratio=0.0, warmup_steps=0, schedule="constant",
                                       weight_decay=0.5, b1=0.9, b2=0.999, eps=1e-8, max_grad_norm=0.0))
  tx, _ = optim.make_optimizer(cfg, 10)

  @jax.jit
  def decay_only(params):  # zero gradients: AdamW moves exactly the decayed parameters
    zeros = jax.tree.map(jax.numpy.zeros_like, params)
    return tx.update(zeros, tx.init(params), params)[0]

  updates = dict(nnx.to_flat_state(decay_only(jax.tree.map(lambda a: np.ones(a.shape, a.dtype), trainable))))
  mask = dict(nnx.to_flat_state(optim.decay_mask(trainable)))  # on the nnx.State, as the optimizer sees it
  got, moved = {}, {}
  for path, key, _, _ in loaders.canonical_sources(model):
    got[key] = bool(getattr(mask[path], "value", mask[path]))
    moved[key] = bool(np.any(np.asarray(updates[path].value) != 0))
  assert got == want
  assert moved == want
