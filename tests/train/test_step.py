"""The training loss against transformers' LlavaForConditionalGeneration loss and gradients, for every way the
logits can be chunked (one chunk, chunks that divide the length, chunks with a ragged last one)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from llava_jax.models.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_jax.train.step import loss_sum
from tests.models.test_llava import IMAGE_TOKEN, hf_llava, mixed_batch, ours_from


def _labels(ids, mask, hf_ids, hf_mask):
  """Ours: collapsed labels with IGNORE at placeholders, padding and the first two tokens; HF: the same, expanded."""
  labels = np.where(mask > 0, ids, IGNORE_INDEX)
  labels[ids == IMAGE_TOKEN_INDEX] = IGNORE_INDEX
  labels[:, :2] = IGNORE_INDEX
  hf_labels = np.where(hf_mask > 0, hf_ids, IGNORE_INDEX)
  hf_labels[hf_ids == IMAGE_TOKEN] = IGNORE_INDEX
  hf_labels[:, :2] = IGNORE_INDEX
  return labels, hf_labels


@pytest.fixture(scope="module")
def reference():
  hf = hf_llava()
  ids, mask, images, hf_ids, hf_mask = mixed_batch()
  labels, hf_labels = _labels(ids, mask, hf_ids, hf_mask)
  hf.zero_grad()
  out = hf(input_ids=torch.from_numpy(hf_ids), attention_mask=torch.from_numpy(hf_mask),
           pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)), labels=torch.from_numpy(hf_labels))
  out.loss.backward()
  grads = {"projector": hf.model.multi_modal_projector.linear_1.weight.grad.numpy().T,
           "lm_head": hf.lm_head.weight.grad.numpy().T}
  batch = {"input_ids": ids, "attention_mask": mask, "images": images, "labels": labels}
  return hf, float(out.loss.detach()), grads, batch


@pytest.mark.parametrize("chunk", [1024, 6, 7, 4])  # length 18: one chunk; 3 that divide it; 3 and 5, ragged
def test_loss_and_gradients_equal_transformers(reference, chunk):
  hf, ref_loss, ref_grads, batch = reference
  model = ours_from(hf)
  graphdef, params = nnx.split(model)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}

  def mean_loss(params):
    total, count = loss_sum(nnx.merge(graphdef, params), batch, chunk)
    return total / count

  loss, grads = jax.jit(jax.value_and_grad(mean_loss))(params)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grads["projector"]["linears"][0]["kernel"].value), ref_grads["projector"],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(grads["language_model"]["lm_head"]["kernel"].value), ref_grads["lm_head"],
                             rtol=1e-5, atol=1e-6)
