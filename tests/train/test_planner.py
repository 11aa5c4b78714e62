"""The memory planner against a hand count of the tiny LLaVA's parameters and the compiler's own argument bytes."""
import json
import os
import subprocess
import sys

import jax

from configs import stage2 as stage2_config
from llava_jax import sharding
from llava_jax.train import planner

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
F32 = 4
MAX_COUNTER_BYTES = 64  # optax's step counters (int32 scalars) next to the moments


def hand_count(c):
  """Parameter counts of the stage-2 tiny config from the architecture: {part: (matrices, vectors)}.

  Matrices are what the partition rules shard over fsdp (all their dimensions are multiples of 8 here);
  vectors (norms, biases, CLIP's embeddings, the patch convolution) stay replicated.
  """
  v, d, f, layers = (c.model.text[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                               "num_hidden_layers"))
  dv, fv, lv = (c.model.vision[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers"))
  patches = (c.model.vision.image_size // c.model.vision.patch_size) ** 2
  llm = (v * d + d * v + layers * (4 * d * d + 3 * d * f),  # embed, lm_head, q k v o, gate up down
         layers * 2 * d + d)  # input / post-attention RMSNorm weights, final norm
  projector = (dv * d + d * d, 2 * d)  # mlp2x_gelu: Linear(dv, d), GELU, Linear(d, d)
  vision = (lv * (4 * dv * dv + 2 * dv * fv),  # q k v out, fc1 fc2
            14 * 14 * 3 * dv + dv + (patches + 1) * dv + 4 * dv  # patch conv, class, positions, pre/post LN
            + lv * (4 * dv + fv + dv + 4 * dv))  # attention biases, fc1/fc2 biases, two LayerNorms
  return {"trainable": (llm[0] + projector[0], llm[1] + projector[1]), "frozen": vision}


def _abstract_bytes(c, devices):
  mesh = sharding.make_mesh(c.mesh.to_dict(), devices)
  with jax.set_mesh(mesh):
    _, _, _, state, frozen, _ = planner.abstract_train_inputs(c, mesh)
  return (planner.per_device_bytes(state.params), planner.per_device_bytes(frozen),
          planner.per_device_bytes(state.opt_state))


def test_parameter_and_optimizer_bytes_match_a_hand_count():
  c = stage2_config.get_config("tiny")
  count = hand_count(c)
  trainable_all = F32 * sum(count["trainable"])
  frozen_all = F32 * sum(count["frozen"])

  trainable, frozen, opt = _abstract_bytes(c, jax.devices()[:1])
  assert (trainable, frozen) == (trainable_all, frozen_all)
  assert 2 * trainable <= opt <= 2 * trainable + MAX_COUNTER_BYTES  # AdamW: mu and nu in float32

  c.mesh.fsdp = 8
  trainable8, frozen8, opt8 = _abstract_bytes(c, jax.devices()[:8])
  vectors = F32 * count["trainable"][1]
  assert trainable8 - vectors == (trainable_all - vectors) / 8  # the matrices: one eighth each
  assert trainable8 == F32 * (count["trainable"][0] // 8 + count["trainable"][1])
  assert frozen8 == F32 * (count["frozen"][0] // 8 + count["frozen"][1])
  assert 2 * trainable8 <= opt8 <= 2 * trainable8 + MAX_COUNTER_BYTES
  assert opt8 - 2 * trainable8 == opt - 2 * trainable  # the counters are replicated


def test_dry_run_compiles_for_fake_devices_and_agrees_with_the_compiler(tmp_path):
  out = tmp_path / "plan.json"
  small = ["--config.model.text.vocab_size=400", "--config.model.text.hidden_size=32",
           "--config.model.vision.hidden_size=32", "--config.model.text.intermediate_size=64",
           "--config.model.vision.intermediate_size=64", "--config.data.max_length=96"]
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}  # the planner sets them
  proc = subprocess.run(
      [sys.executable, "-m", "llava_jax.main", "--config=configs/stage2.py:tiny", "--dry_run", "--plan_devices=8",
       "--plan_device_memory_gib=0.001", f"--plan_json={out}", "--config.mesh.fsdp=-1", *small],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
  text = proc.stdout.decode()
  assert proc.returncode == 0, text[-3000:]
  plan = json.loads(out.read_text())
  assert plan["num_devices"] == 8 and plan["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert plan["platform"] == "cpu"

  c = stage2_config.get_config("tiny")
  c.model.text.vocab_size, c.model.text.hidden_size, c.model.vision.hidden_size = 400, 32, 32
  c.model.text.intermediate_size = c.model.vision.intermediate_size = 64
  count = hand_count(c)
  assert plan["trainable_params"] == F32 * (count["trainable"][0] // 8 + count["trainable"][1])
  assert plan["frozen_params"] == F32 * (count["frozen"][0] // 8 + count["frozen"][1])
  assert plan["gradients"] == plan["trainable_params"]
  # one row of 96 token ids, labels, mask and one 28 x 28 image per device
  assert plan["batch"] == 3 * 96 * 4 + 28 * 28 * 3 * F32

  # The compiler's per-device arguments: the same arrays, less any it found unused (CLIP's post_layernorm,
  # which LLaVA never applies); the donated state comes back in place.
  ours = plan["trainable_params"] + plan["frozen_params"] + plan["optimizer_state"] + plan["batch"] + 4
  unused = 2 * 32 * F32
  assert 0 <= ours - plan["compiled_arguments"] <= unused
  state = plan["trainable_params"] + plan["optimizer_state"] + 4
  assert plan["compiled_aliased"] == state
  assert plan["compiled_temp"] > plan["gradients"]
  assert plan["peak"] > plan["device_memory_bytes"] and plan["verdict"].startswith("does not fit")
  assert "verdict: does not fit" in text and "trainable parameters" in text
