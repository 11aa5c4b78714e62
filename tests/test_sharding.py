"""Mesh, partition rules, and the sharded LLaVA forward pass on 8 fake CPU devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from llava_jax import sharding
from tests.models.test_llava import hf_llava, mixed_batch, ours_from


def test_make_mesh_fills_minus_one():
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 2})
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 2})


def test_partition_spec_drops_axes_that_do_not_divide():
  mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
  spec = sharding.partition_spec("language_model.layers.self_attn.k_proj.kernel", (2, 48, 96), mesh)
  assert spec == P(None, "fsdp", "tensor")
  spec = sharding.partition_spec("language_model.layers.self_attn.k_proj.kernel", (2, 48, 6), mesh)
  assert spec == P(None, "fsdp")
  assert sharding.partition_spec("language_model.norm.weight", (48,), mesh) == P()


@pytest.mark.parametrize("mesh_shape", [{"data": 2, "fsdp": 2, "tensor": 2}, {"data": 1, "fsdp": 8, "tensor": 1}])
def test_sharded_forward_equals_unsharded(mesh_shape):
  hf = hf_llava()
  ids, mask, images, _, _ = mixed_batch()
  rows = [0, 1, 2, 0, 1, 2, 0, 1]  # batch 8 divides data x fsdp; images follow their rows' placeholders
  ids, mask = ids[rows], mask[rows]
  per_row = {0: [images[0]], 1: [images[1], images[2]], 2: []}
  images = np.stack(sum((per_row[r] for r in rows), []) + [np.zeros_like(images[0])] * 7)  # 9 + 7 unused slots
  model = ours_from(hf)
  expected, _ = model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(images))

  mesh = sharding.make_mesh(mesh_shape)
  sharded = ours_from(hf)
  sharding.shard_model(sharded, mesh)
  graphdef, state = nnx.split(sharded)
  kernel = state["language_model"]["layers"]["mlp"]["gate_proj"]["kernel"].value
  assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated

  @jax.jit
  def forward(state, ids, mask, images):
    logits, _ = nnx.merge(graphdef, state)(ids, mask, images)
    return logits

  batch = lambda a: jax.device_put(a, sharding.batch_sharding(mesh, a.ndim))
  with jax.set_mesh(mesh):
    got = forward(state, batch(ids), batch(mask), jax.device_put(images, sharding.batch_sharding(mesh, 4)))
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)
