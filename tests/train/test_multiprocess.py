"""Several JAX processes on one machine (launch/local.sh, jax.distributed on 127.0.0.1, gloo collectives).

The references are single-process runs of the same program: 2 processes x 4 devices must train like 1 process x 8
devices, and a checkpoint written by 2 processes must resume in 1 process on another mesh.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from llava_jax import demo, model_folder
from llava_jax.data import demo as demo_data
from llava_jax.train import checkpoint as ckpt_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOCAL_SH = os.path.join(REPO, "launch", "local.sh")
STEPS = 10


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """Shapes data where every 8th record has no image, read in file order.

  Global batch j is records 8j..8j+7; with 2 processes, process 0 gets 3 images and process 1 gets 4, so process
  0's image block has a padding slot before process 1's images (what `trainer.global_image_order` handles).
  """
  root = tmp_path_factory.mktemp("mp_data")
  paths = demo_data.write_demo_dataset(root, seed=3, num_stage1=8, num_stage2=96, num_heldout=8, image_size=28)
  tok = demo.build_tokenizer(demo._corpus({paths["stage2"]: "vicuna_v1"}), str(root / "tok"), 400)
  rows = json.load(open(paths["stage2"]))
  for i, row in enumerate(rows):
    if i % 8 == 0:
      del row["image"]
      for turn in row["conversations"]:
        turn["value"] = turn["value"].replace("\n<image>", "").replace("<image>\n", "").replace("<image>", "")
  mixed = root / "mixed.json"
  mixed.write_text(json.dumps(rows))
  from transformers import AutoTokenizer
  return {"train": str(mixed), "image_folder": paths["image_folder"], "tokenizer": tok,
          "vocab": len(AutoTokenizer.from_pretrained(tok)), "cache": root / "jax_cache"}


def _launch(num_processes, devices_per_process, workdir, data, *extra):
  """Starts `python -m llava_jax.main` in `num_processes` processes (launch/local.sh); -> Popen."""
  args = [LOCAL_SH, str(num_processes), "--config=configs/stage2.py:tiny", f"--workdir={workdir}",
          f"--config.data.data_files={data['train']}", f"--config.data.image_folder={data['image_folder']}",
          f"--config.tokenizer={data['tokenizer']}", f"--config.model.text.vocab_size={data['vocab']}",
          "--config.model.text.hidden_size=32", "--config.model.vision.hidden_size=32",
          "--config.model.text.intermediate_size=64", "--config.model.vision.intermediate_size=64",
          "--config.data.max_length=192", "--config.data.length_buckets=(192,)",
          "--config.data.shuffle=False", "--config.data.group_by_modality_length=False",
          f"--config.num_train_steps={STEPS}", "--config.checkpoint_every=5", "--config.log_every=1",
          "--config.async_checkpoint=False", *extra]
  env = dict(os.environ, DEVICES_PER_PROCESS=str(devices_per_process), PYTHON=sys.executable, XLA_FLAGS="")
  if num_processes == 1:  # single-process runs share their many small compilations (random and optimizer init);
    # processes of one multi-process run must not load each other's executables
    env.update(JAX_COMPILATION_CACHE_DIR=str(data["cache"]), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(proc, timeout=900) -> str:
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out.decode()[-4000:]
  return out.decode()


def _process_pid(workdir, rank):
  """pid of the `llava_jax.main` process with LLAVA_PROCESS_ID=rank training in `workdir`."""
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/cmdline", "rb") as f:
        cmdline = f.read().split(b"\0")
      with open(f"/proc/{entry}/environ", "rb") as f:
        environ = f.read().split(b"\0")
    except OSError:
      continue
    if (b"llava_jax.main" in cmdline and f"--workdir={workdir}".encode() in cmdline
        and f"LLAVA_PROCESS_ID={rank}".encode() in environ):
      return int(entry)
  raise AssertionError(f"no process {rank} training in {workdir}")


def _losses(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _params(folder):
  flat = {}

  def walk(tree, prefix):
    for k, v in tree.items():
      if isinstance(v, dict):
        walk(v, prefix + (k,))
      else:
        flat[prefix + (k,)] = np.asarray(v)

  walk(model_folder.load_numpy_params(folder), ())
  return flat


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
  """one: 1 process x 8 devices; two: 2 processes x 4 devices; stopped: like two, SIGTERM to process 1 only."""
  root = tmp_path_factory.mktemp("mp_runs")
  one, two, stopped = (_launch(1, 8, root / "one", data), _launch(2, 4, root / "two", data),
                       _launch(2, 4, root / "stopped", data))
  deadline = time.time() + 900
  while not (root / "stopped" / "checkpoints" / "5").exists() and stopped.poll() is None and time.time() < deadline:
    time.sleep(0.1)
  if stopped.poll() is not None:
    _finish(stopped)  # ended before its first checkpoint: show why
  os.kill(_process_pid(root / "stopped", 1), signal.SIGTERM)
  outputs = {"one": _finish(one), "two": _finish(two), "stopped": _finish(stopped)}
  return root, outputs


def test_two_processes_train_like_one(runs):
  root, _ = runs
  one, two = _losses(root / "one"), _losses(root / "two")
  assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=1e-6, atol=1e-6)
  a, b = _params(root / "one" / "model"), _params(root / "two" / "model")
  assert a.keys() == b.keys()
  for path in a:
    np.testing.assert_allclose(b[path], a[path], rtol=1e-6, atol=1e-6, err_msg=str(path))


def test_a_signal_to_one_process_stops_all_at_the_same_step(runs):
  root, outputs = runs
  steps = sorted(int(s) for s in os.listdir(root / "stopped" / "checkpoints"))
  stop = steps[-1]
  # saved where the processes agreed to stop (the signal came after checkpoint 5 was written), before the end
  assert 5 <= stop < STEPS, steps
  assert not (root / "stopped" / "model").exists()
  assert f"(in another process): saved step {stop}" in outputs["stopped"]  # process 0 was not signalled


def test_two_process_checkpoint_resumes_in_one_process_on_another_mesh(runs, data):
  root, _ = runs
  stop = max(int(s) for s in os.listdir(root / "stopped" / "checkpoints"))
  checkpoint = root / "stopped" / "checkpoints" / str(stop)
  assert sorted(json.loads((checkpoint / "data" / "metadata").read_text())) == ["0", "1"]  # both data positions
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(checkpoint / "state"))  # both wrote shards
  os.remove(root / "stopped" / "metrics.jsonl")
  # fsdp 4 x tensor 2 in one process: orbax reshards the state written as fsdp 8 by 2 processes
  _finish(_launch(1, 8, root / "stopped", data, "--config.mesh.fsdp=4", "--config.mesh.tensor=2"))
  one, after = _losses(root / "one"), _losses(root / "stopped")
  assert sorted(after) == list(range(stop + 1, STEPS + 1))  # continued after the saved step, on the next records
  np.testing.assert_allclose([after[s] for s in sorted(after)], [one[s] for s in sorted(after)], rtol=1e-5)
  a, b = _params(root / "one" / "model"), _params(root / "stopped" / "model")
  for path in a:
    np.testing.assert_allclose(b[path], a[path], rtol=1e-4, atol=1e-6, err_msg=str(path))


def test_local_launcher_stops_the_others_when_one_fails(tmp_path):
  script = ('import os, sys, time\n'
            'if os.environ["LLAVA_PROCESS_ID"] == "1": sys.exit(3)\n'
            'time.sleep(120)\n')
  start = time.time()
  proc = subprocess.run([LOCAL_SH, "3", "--", sys.executable, "-c", script], env=dict(os.environ, KILL_GRACE="2"),
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
  assert proc.returncode == 3, proc.stdout.decode()
  assert time.time() - start < 30
  assert "process 1 exited with status 3" in proc.stdout.decode()


def test_local_launcher_gives_each_process_its_rank(tmp_path):
  script = 'import os; print("rank", os.environ["LLAVA_PROCESS_ID"], "of", os.environ["LLAVA_NUM_PROCESSES"], ' \
           'os.environ["LLAVA_COORDINATOR"].startswith("127.0.0.1:"), os.environ["XLA_FLAGS"].split()[0])'
  proc = subprocess.run([LOCAL_SH, "2", "--", sys.executable, "-c", script],
                        env=dict(os.environ, DEVICES_PER_PROCESS="3"), stdout=subprocess.PIPE, timeout=60)
  assert proc.returncode == 0
  lines = sorted(proc.stdout.decode().splitlines())
  assert lines == ["[p0] rank 0 of 2 True --xla_force_host_platform_device_count=3",
                   "[p1] rank 1 of 2 True --xla_force_host_platform_device_count=3"]


def test_reshard_data_states_continues_the_global_order():
  # 96 records: 2 processes read positions p, p + 2, ...; after 40 each, positions 0..79 are read.
  states = {str(p): {"parent": {"next_index": 40}, "skipped": {"bad_image": p + 1}} for p in range(2)}
  one, left_out = ckpt_lib.reshard_data_states(states, 96, 1)
  assert one == [{"parent": {"next_index": 80}, "skipped": {"bad_image": 3}}] and left_out == 0
  three, _ = ckpt_lib.reshard_data_states(states, 96, 3)
  # process q of 3 reads q, q + 3, ...: the next positions 80, 81, 82 go to processes 2, 0, 1
  assert [s["parent"]["next_index"] * 3 + q for q, s in enumerate(three)] == [81, 82, 80]
  # a process that skipped records is ahead: the other's unread position 37 * 2 + 1 is left out
  uneven = {"0": {"parent": {"next_index": 38}}, "1": {"parent": {"next_index": 37}}}
  one, left_out = ckpt_lib.reshard_data_states(uneven, 96, 1)
  assert one[0]["parent"]["next_index"] == 76 and left_out == 1
  # across the epoch boundary: 21 records, 10 per process and epoch; process 0 finished epoch 0
  one, left_out = ckpt_lib.reshard_data_states({"0": {"parent": {"next_index": 10}},
                                                "1": {"parent": {"next_index": 9}}}, 21, 1)
  assert one[0]["parent"]["next_index"] == 21 and left_out == 1
  with pytest.raises(ValueError, match="worker_count"):
    ckpt_lib.reshard_data_states({"0": {"parent": {"workers": []}}}, 96, 2)
