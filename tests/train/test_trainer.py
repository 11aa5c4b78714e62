"""The trainer on CPU: stages, frozen parameters, sharding, accumulation and exact resume."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from configs import stage1 as stage1_config
from configs import stage2 as stage2_config
from llava_jax import demo, model_folder
from llava_jax.data import demo as demo_data
from llava_jax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """A small shapes dataset and a tokenizer trained on it (small vocabulary keeps the LM head cheap)."""
  root = tmp_path_factory.mktemp("data")
  paths = demo_data.write_demo_dataset(root, seed=1, num_stage1=96, num_stage2=96, num_heldout=8, image_size=28)
  tok = demo.build_tokenizer(demo._corpus({paths["stage1"]: "plain", paths["stage2"]: "vicuna_v1"}), str(root / "tok"), 400)
  from transformers import AutoTokenizer
  paths["tokenizer"] = tok
  paths["vocab"] = len(AutoTokenizer.from_pretrained(tok))
  return paths


def make_config(stage, data, **overrides):
  c = (stage1_config if stage == 1 else stage2_config).get_config("tiny")
  c.data.data_files = data["stage1" if stage == 1 else "stage2"]
  c.data.image_folder = data["image_folder"]
  c.tokenizer = data["tokenizer"]
  c.model.text.vocab_size = data["vocab"]
  c.model.text.hidden_size = c.model.vision.hidden_size = 32
  c.model.text.intermediate_size = c.model.vision.intermediate_size = 64
  c.data.max_length, c.data.length_buckets = (64, (64,)) if stage == 1 else (192, (96, 192))
  c.async_checkpoint = False
  c.log_every = 1
  for key, value in overrides.items():
    target = c
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return c


def _params(folder):
  return {k: np.asarray(v) for k, v in _flat(model_folder.load_numpy_params(folder)).items()}


def _flat(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  by_step = {}
  for r in rows:
    if "loss" in r:
      by_step[r["step"]] = r["loss"]  # a resumed run re-logs steps after its checkpoint: keep the last
  return [by_step[s] for s in sorted(by_step)]


def test_stage1_then_stage2_loss_falls_and_frozen_parts_do_not_move(data, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # relative workdirs and init_model, as the README's `--workdir=runs/stage1`
  cfg1 = make_config(1, data, num_train_steps=25)
  result1 = trainer.train(cfg1, "s1", devices=jax.devices()[:1])
  assert np.mean(result1.losses[-5:]) < np.mean(result1.losses[:5])
  init = _params(result1.model_dir)
  assert os.path.exists(tmp_path / "s1" / "projector.safetensors")

  cfg2 = make_config(2, data, num_train_steps=25, init_model=result1.model_dir)
  result2 = trainer.train(cfg2, "s2", devices=jax.devices()[:1])
  assert np.mean(result2.losses[-5:]) < np.mean(result2.losses[:5])
  final = _params(result2.model_dir)
  # each folder records the template and aspect it was trained with (generation builds the same prompt)
  assert model_folder.load_config(result1.model_dir).template == "plain"
  assert model_folder.load_config(result2.model_dir).template == "vicuna_v1"
  assert model_folder.load_config(result2.model_dir).image_aspect_ratio == "pad"
  for path, value in init.items():
    if path[0] == "vision_tower":
      np.testing.assert_array_equal(final[path], value, err_msg=str(path))  # frozen: bitwise unchanged
    else:
      assert not np.array_equal(final[path], value), path  # trained: projector and LLM moved

  # stage 1's projector file loads as LLaVA's mm_projector.bin keys
  from safetensors.numpy import load_file
  proj = load_file(str(tmp_path / "s1" / "projector.safetensors"))
  assert sorted(proj) == ["model.mm_projector.0.bias", "model.mm_projector.0.weight", "model.mm_projector.2.bias",
                          "model.mm_projector.2.weight"]
  np.testing.assert_array_equal(proj["model.mm_projector.0.weight"],
                                init[("projector", "linears", "0", "kernel")].T)


def test_weighted_mixture_from_python_and_command_line_and_its_epoch_steps(data):
  from absl import flags
  from ml_collections import config_flags
  folder = str(data["image_folder"])
  mixture = [{"path": str(data["stage2"]), "image_folder": folder, "weight": 2.0},
             {"path": str(data["stage1"]), "image_folder": folder, "weight": 0.5}]
  cfg = make_config(2, data, num_train_steps=-1, num_epochs=1.0, batch_size=8)
  cfg.data.data_files = mixture  # the README's form, set from Python
  assert trainer.data_config(cfg, cfg.data.data_files)["data_files"] == mixture
  # an epoch visits a weight-2 file's records twice and a random half of a weight-0.5 file's (records.DataFile)
  sizes = [len(json.load(open(f["path"]))) for f in mixture]
  assert trainer.total_train_steps(cfg) == (2 * sizes[0] + round(0.5 * sizes[1])) // 8

  def from_command_line(value):
    argv = ["main", f"--config={REPO}/configs/stage2.py:tiny", f"--config.data.data_files={value}"]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=flag_values, lock_config=True, sys_argv=argv)
    flag_values(argv)
    config = flag_values["config"].value
    return trainer.data_config(config, config.data.data_files)["data_files"]

  assert from_command_line(repr(mixture)) == mixture  # a Python literal
  as_json = [dict(mixture[0], image_folder=None), mixture[1]]
  assert from_command_line(json.dumps(as_json)) == as_json  # JSON text (null)
  assert from_command_line(data["stage2"]) == [{"path": str(data["stage2"]), "image_folder": None}]
  with pytest.raises(ValueError, match=r"data.data_files=.*neither a path nor a JSON list"):
    from_command_line("[{'path': 'a.json'")


def _mixed_data_file(data, path):
  """The stage-2 records with every third one made text-only (mix665k has a sixth text-only)."""
  rows = json.load(open(data["stage2"]))
  for row in rows[::3]:
    del row["image"]
    for turn in row["conversations"]:
      turn["value"] = turn["value"].replace("<image>\n", "").replace("\n<image>", "").replace("<image>", "")
  path.write_text(json.dumps(rows))
  return str(path)


def test_feeder_image_counts_take_the_pipeline_buckets_and_the_loss_is_unchanged(data, tmp_path):
  import jax.numpy as jnp
  from transformers import AutoTokenizer
  from llava_jax import sharding
  from llava_jax.data import pipeline
  from llava_jax.models.config import IMAGE_TOKEN_INDEX, ModelConfig
  from llava_jax.models.llava import LlavaModel
  from llava_jax.train.step import loss_sum
  cfg = make_config(2, data, **{"data.group_by_modality_length": False})
  model_cfg = ModelConfig.from_dict(cfg.model.to_dict())
  data_cfg = trainer.data_config(cfg, _mixed_data_file(data, tmp_path / "mixed.json"), batch_size=16,
                                 num_epochs=None)
  buckets = trainer.micro_batch_image_buckets(data_cfg, 8)
  assert buckets == (0, 2, 4, 8)  # the pipeline's default for 8 rows: 0, B/4, B/2, B
  iterator = pipeline.make_train_iterator(data_cfg, AutoTokenizer.from_pretrained(data["tokenizer"]), model_cfg)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  feeder = trainer.BatchFeeder(iterator, mesh, 2, buckets)  # 2 micro-batches of 8 rows
  real, fed_counts, padded = set(), set(), None
  for _ in range(10):
    batch = jax.tree.map(np.asarray, feeder.next()[0])
    fed_counts.add(batch["images"].shape[1])
    n_real = (batch["input_ids"] == IMAGE_TOKEN_INDEX).sum(axis=(1, 2))  # placeholders of each micro-batch
    real.update(n_real.tolist())
    if padded is None and n_real[0] < batch["images"].shape[1]:
      padded = {k: v[0] for k, v in batch.items()}, int(n_real[0])
  assert fed_counts <= set(buckets) and len(real) > len(fed_counts), (real, fed_counts)

  # the padding images enter neither the splice nor the loss: the loss with only the real images is the same
  micro, n = padded
  assert n > 0 and not micro["images"][n:].any()

  @jax.jit
  def losses(bucketed, unbucketed):
    model = LlavaModel(model_cfg, rngs=nnx.Rngs(0))
    return jnp.stack([loss_sum(model, b, 64)[0] for b in (bucketed, unbucketed)])

  with_padding, without = losses(micro, dict(micro, images=micro["images"][:n]))
  np.testing.assert_allclose(with_padding, without, rtol=1e-6)


@pytest.mark.parametrize("projector_type", ["linear", "mlp2x_gelu"])
def test_stage1_projector_file_loads_into_llavas_mm_projector(projector_type, tmp_path):
  import dataclasses
  import torch
  from safetensors.torch import load_file
  from llava_jax.models.projector import Projector
  from tests.test_model_folder import CFG
  cfg = dataclasses.replace(CFG, projector_type=projector_type)
  ours = Projector(projector_type, cfg.vision.hidden_size, cfg.text.hidden_size, rngs=nnx.Rngs(3))
  trainer.save_projector(str(tmp_path / "projector.safetensors"), cfg, nnx.State({"projector": nnx.state(ours)}))
  # LLaVA's builder.py and its load of a stage-1 mm_projector file (strict load_state_dict of get_w(...))
  d_in, d_out = cfg.vision.hidden_size, cfg.text.hidden_size
  theirs = (torch.nn.Linear(d_in, d_out) if projector_type == "linear" else
            torch.nn.Sequential(torch.nn.Linear(d_in, d_out), torch.nn.GELU(), torch.nn.Linear(d_out, d_out)))
  weights = load_file(str(tmp_path / "projector.safetensors"))
  get_w = lambda weights, keyword: {k.split(keyword + ".")[1]: v for k, v in weights.items() if keyword in k}
  theirs.load_state_dict(get_w(weights, "mm_projector"), strict=True)
  first = theirs if projector_type == "linear" else theirs[0]
  np.testing.assert_array_equal(first.weight.detach().numpy(), np.asarray(ours.linears[0].kernel.value).T)
  features = np.random.default_rng(0).standard_normal((5, d_in)).astype(np.float32)
  np.testing.assert_allclose(theirs(torch.from_numpy(features)).detach().numpy(), ours(features), rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("stage", [1, 2])
def test_optimizer_state_only_for_trainable_parameters(data, stage):
  from llava_jax.models.config import ModelConfig
  from llava_jax.models.llava import LlavaModel
  from llava_jax.train import optim
  cfg = make_config(stage, data)
  model = nnx.eval_shape(lambda: LlavaModel(ModelConfig.from_dict(cfg.model.to_dict()), rngs=nnx.Rngs(0)))
  _, trainable, frozen = nnx.split(model, optim.trainable_filter(optim.STAGE_TRAINABLE[stage]), ...)
  tx, _ = optim.make_optimizer(cfg.optim, 10)
  opt_state = jax.eval_shape(tx.init, trainable)
  parts = {p[0] for p, _ in nnx.to_flat_state(trainable)}
  assert parts == ({"projector"} if stage == 1 else {"projector", "language_model"})
  assert {p[0] for p, _ in nnx.to_flat_state(frozen)} == {"vision_tower", "projector", "language_model"} - parts
  leaves = jax.tree_util.tree_flatten_with_path(opt_state)[0]
  big = [jax.tree_util.keystr(p) for p, leaf in leaves if getattr(leaf, "ndim", 0) > 0]
  assert big and all(any(part in k for part in parts) for k in big)
  assert not any("vision_tower" in k for k in big)


def test_eight_devices_fsdp_tensor_equal_one_device(data, tmp_path):
  one = trainer.train(make_config(2, data, num_train_steps=4), str(tmp_path / "one"), devices=jax.devices()[:1])
  cfg = make_config(2, data, num_train_steps=4, **{"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2})
  eight = trainer.train(cfg, str(tmp_path / "eight"))
  np.testing.assert_allclose(eight.losses, one.losses, rtol=1e-5)
  a, b = _params(one.model_dir), _params(eight.model_dir)
  for path in a:
    np.testing.assert_allclose(b[path], a[path], rtol=1e-4, atol=1e-6, err_msg=str(path))


def test_accumulating_four_micro_batches_of_two_equals_one_batch_of_eight(data, tmp_path):
  # LLaVA's loss is the mean over the supervised tokens of the whole batch, micro-batches included.
  full = trainer.train(make_config(2, data, num_train_steps=3, batch_size=8), str(tmp_path / "full"),
                       devices=jax.devices()[:1])
  accum = trainer.train(make_config(2, data, num_train_steps=3, batch_size=8, accum_steps=4),
                        str(tmp_path / "accum"), devices=jax.devices()[:1])
  np.testing.assert_allclose(accum.losses, full.losses, rtol=1e-5)
  a, b = _params(full.model_dir), _params(accum.model_dir)
  for path in a:
    np.testing.assert_allclose(b[path], a[path], rtol=1e-4, atol=1e-6, err_msg=str(path))


def _run_main(workdir, data, steps, env):
  args = [sys.executable, "-m", "llava_jax.main", "--config=configs/stage2.py:tiny", f"--workdir={workdir}",
          f"--config.data.data_files={data['stage2']}", f"--config.data.image_folder={data['image_folder']}",
          f"--config.tokenizer={data['tokenizer']}", f"--config.model.text.vocab_size={data['vocab']}",
          "--config.model.text.hidden_size=32", "--config.model.vision.hidden_size=32",
          f"--config.num_train_steps={steps}", "--config.checkpoint_every=4", "--config.log_every=1",
          "--config.async_checkpoint=False", "--config.mesh.fsdp=1"]
  return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_sigkill_then_resume_is_bitwise_identical(data, tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  steps = 10
  straight = _run_main(tmp_path / "straight", data, steps, env)
  out, _ = straight.communicate(timeout=600)
  assert straight.returncode == 0, out.decode()[-3000:]

  killed = _run_main(tmp_path / "killed", data, steps, env)
  marker = tmp_path / "killed" / "checkpoints" / "4"
  deadline = time.time() + 600
  while not marker.exists() and killed.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert marker.exists(), killed.communicate()[0].decode()[-3000:]
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  assert not (tmp_path / "killed" / "model").exists()
  resumed = _run_main(tmp_path / "killed", data, steps, env)
  out, _ = resumed.communicate(timeout=600)
  assert resumed.returncode == 0, out.decode()[-3000:]

  assert _losses(tmp_path / "killed") == _losses(tmp_path / "straight")
  a, b = _params(tmp_path / "straight" / "model"), _params(tmp_path / "killed" / "model")
  for path in a:
    np.testing.assert_array_equal(b[path], a[path], err_msg=str(path))


def test_train_step_leaves_state_unchanged_on_non_finite_loss(data):
  import jax.numpy as jnp
  from llava_jax.models.config import ModelConfig
  from llava_jax.models.llava import LlavaModel
  from llava_jax.train import optim
  from llava_jax.train.step import TrainState, make_train_step
  cfg = make_config(2, data)
  model = LlavaModel(ModelConfig.from_dict(cfg.model.to_dict()), rngs=nnx.Rngs(0))
  graphdef, trainable, frozen = nnx.split(model, optim.trainable_filter(optim.STAGE_TRAINABLE[2]), ...)
  tx, schedule = optim.make_optimizer(cfg.optim, 10)
  kernel = trainable["projector"]["linears"][0]["kernel"]
  kernel.value = kernel.value.at[0, 0].set(jnp.inf)
  state = TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable))
  ids = jnp.array([[[1, -200, 5, 6, 7, 0]]], jnp.int32)
  batch = {"input_ids": ids, "labels": jnp.where(ids > 1, ids, -100), "attention_mask": (ids != 0).astype(jnp.int32),
           "images": jnp.ones((1, 1, 28, 28, 3))}
  before = jax.tree.map(np.asarray, state)
  new_state, metrics = jax.jit(make_train_step(graphdef, tx, schedule, loss_chunk=8))(state, frozen, batch)
  assert not bool(metrics["finite"])
  assert int(new_state.step) == 0
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, new_state), before)


def test_non_finite_loss_stops_with_message_and_keeps_last_checkpoint(data, tmp_path, monkeypatch):
  real = trainer.make_train_step

  def poisoned(*args, **kw):
    step_fn = real(*args, **kw)

    def wrapped(state, frozen, batch):
      new_state, metrics = step_fn(state, frozen, batch)
      bad = state.step >= 6  # the 7th update "diverges": report it and keep the old state, as the step does
      metrics = dict(metrics, finite=metrics["finite"] & ~bad, loss=jax.numpy.where(bad, jax.numpy.nan,
                                                                                    metrics["loss"]))
      keep = lambda n, o: jax.tree.map(lambda a, b: jax.numpy.where(bad, b, a), n, o)
      return type(state)(jax.numpy.where(bad, state.step, new_state.step), keep(new_state.params, state.params),
                         keep(new_state.opt_state, state.opt_state)), metrics
    return wrapped

  monkeypatch.setattr(trainer, "make_train_step", poisoned)
  cfg = make_config(2, data, num_train_steps=12, checkpoint_every=5)
  with pytest.raises(trainer.NonFiniteLossError, match="non-finite loss or gradient at step 7"):
    trainer.train(cfg, str(tmp_path / "run"), devices=jax.devices()[:1])
  steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [5]
  assert not (tmp_path / "run" / "model").exists()
