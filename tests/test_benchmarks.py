"""benchmarks/train_step.py: its inputs against the model's splice, its FLOP count against the spec's reference
figures, and one small end-to-end run of llava_jax and the PyTorch peer on CPU."""
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llava_jax.models.llava import LlavaModel, splice

SCRIPT = pathlib.Path(__file__).parent.parent / "benchmarks" / "train_step.py"
_spec = importlib.util.spec_from_file_location("train_step_benchmark", SCRIPT)
ts = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = ts  # dataclasses look their module up
_spec.loader.exec_module(ts)

# performance.md, HF rows: (step s, model TFLOP/s) measured with the spec's FLOP count; their product is the
# FLOPs of one step, to the rounding of the printed figures.
SPEC_HF = {"stage1-7b": (0.675, 430), "stage2-1b": (0.319, 406), "stage2-7b": (0.751, 479),
           "stage2-7b-remat": (1.932, 372)}


@pytest.mark.parametrize("name", list(ts.CASES))
def test_step_flops_match_the_spec_reference(name):
  case = ts.CASES[name]
  cfg, runtime = ts.model_config(case)
  counts = ts.param_counts(nnx.eval_shape(lambda: LlavaModel(cfg, runtime, rngs=nnx.Rngs(0))))
  step_s, tflops = SPEC_HF[name]
  # 3 printed digits on each figure: at most 0.12% + 0.08% apart.
  assert ts.step_flops(case, *counts) == pytest.approx(step_s * tflops * 1e12, rel=2.5e-3)


@pytest.mark.parametrize("small,name", [(False, "stage1-7b"), (False, "stage2-7b-remat"), (True, "stage2-1b")])
def test_batch_expands_to_seq_with_image_first(small, name):
  case = (ts.SMALL_CASES if small else ts.CASES)[name]
  rows = ts.make_rows(case)
  batch = {k: v[0] for k, v in ts.ours_batch(case, rows).items()}  # accum = 1
  b, p, n_text = case.batch, case.image_tokens, case.seq - case.image_tokens
  assert batch["images"].shape == (b, case.vision["image_size"], case.vision["image_size"], 3)
  ids = jnp.asarray(batch["input_ids"])
  text_embeds = jnp.broadcast_to(ids[..., None].astype(jnp.float32), ids.shape + (2,))
  features = 1e6 + jnp.arange(b * p * 2, dtype=jnp.float32).reshape(b, p, 2)
  out = jax.jit(splice)(ids, jnp.asarray(batch["attention_mask"]), text_embeds, features, jnp.asarray(batch["labels"]))
  assert out.mask.shape == (b, case.seq) and bool(out.mask.all())  # every one of the seq positions is real
  np.testing.assert_array_equal(out.embeds[:, :p], features)
  np.testing.assert_array_equal(out.embeds[:, p:, 0], rows["text_ids"])
  np.testing.assert_array_equal(out.positions, np.broadcast_to(np.arange(case.seq), (b, case.seq)))
  # Loss on the second half of the text, the same targets on the peer's side.
  labels = np.asarray(out.labels)
  assert (labels[:, :p + n_text // 2] == -100).all()
  np.testing.assert_array_equal(labels[:, p + n_text // 2:], rows["text_ids"][:, n_text // 2:])
  peer_ids, peer_labels = ts.peer_ids_labels(case, rows)
  np.testing.assert_array_equal(peer_labels, labels)
  image_id = case.text["vocab_size"] - 1
  assert (peer_ids[:, :p] == image_id).all() and (peer_ids[:, p:] < image_id).all()
  assert ts.supervised_tokens(rows) == b * (n_text - n_text // 2)


def _run(tmp_path, *args, timeout=300):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True,
                        timeout=timeout, cwd=tmp_path)


def test_small_run_ours_and_peer(tmp_path):
  out = tmp_path / "table.md"
  proc = _run(tmp_path, "--small", "--peer", "--cases=stage2-7b-remat", f"--out={out}",
              "--variant=plain:recompute_elementwise=0,loss_chunk=8,remat_policy=dots")
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(out.with_suffix(".json").read_text())["results"]
  assert [(r["case"], r["impl"], r["status"]) for r in results] == [
      ("stage2-7b-remat", "llava_jax", "ok"), ("stage2-7b-remat", "peer", "ok"),
      ("stage2-7b-remat", "llava_jax[plain]", "ok")], results
  ours, peer, variant = results
  assert ours["recompute_elementwise"] and ours["loss_chunk"] == 1024 and ours["scan_layers"]
  assert (not variant["recompute_elementwise"] and variant["loss_chunk"] == 8 and variant["remat_policy"] == "dots"
          and variant["scan_layers"])
  # Same model, data and math: the same loss to float rounding.
  assert variant["loss"] == pytest.approx(ours["loss"], abs=1e-2)
  case = ts.SMALL_CASES["stage2-7b-remat"]
  n_text = case.seq - case.image_tokens
  for r in results:
    assert r["supervised_tokens"] == case.batch * (n_text - n_text // 2)
    assert r["finite"] and abs(r["loss"] - math.log(case.text["vocab_size"])) < 1.5  # random init: ~ln(V)
    assert r["step_s"] > 0 and r["tokens_per_s"] == pytest.approx(case.batch * case.seq / r["step_s"])
  # The FLOP count from transformers' parameters equals the one from ours.
  assert ours["flops"] == peer["flops"]
  assert ours["remat_policy"] == "full" and peer["gradient_checkpointing"]
  assert ours["step_compiles"] == 1 and ours["compiles_in_timed_loop"] == 0
  assert ours["matmul_tflops"] > 0
  table = out.read_text()
  assert table in proc.stdout
  row = next(line for line in table.splitlines() if line.startswith("| stage2-7b-remat | llava_jax"))
  assert row.rstrip(" |").endswith(f"{peer['step_s'] / ours['step_s']:.2f}x")
  assert "1 (+0 timed)" in row and "model FLOPs/step" in table
  row = next(line for line in table.splitlines() if line.startswith("| stage2-7b-remat | llava_jax[plain]"))
  assert row.rstrip(" |").endswith(f"{peer['step_s'] / variant['step_s']:.2f}x")
  assert "llava_jax[plain]: scan_layers True, recompute_elementwise False, loss chunk 8, remat dots" in table


def test_a_malformed_variant_is_refused(tmp_path):
  proc = _run(tmp_path, "--small", "--variant=fast:chunk=8", timeout=60)
  assert proc.returncode != 0 and "'chunk=8' is not key=value with a key in" in proc.stderr


def test_a_case_that_times_out_becomes_a_row(tmp_path):
  proc = _run(tmp_path, "--small", "--cases=stage1-7b", "--timeout_s=2", timeout=60)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| stage1-7b | llava_jax | 4 x 24 | timeout (2 s) |" in proc.stdout


def test_unknown_case_is_refused(tmp_path):
  proc = _run(tmp_path, "--cases=stage3-70b", timeout=60)
  assert proc.returncode != 0 and "unknown cases ['stage3-70b']" in proc.stderr


def test_trace_summary_finds_the_xla_ops_of_a_profiled_run(tmp_path):
  spec = importlib.util.spec_from_file_location("trace_summary", SCRIPT.parent / "trace_summary.py")
  summary = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(summary)
  f = jax.jit(lambda a: jnp.tanh(a @ a).sum())
  a = jnp.ones((256, 256))
  f(a).block_until_ready()
  with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
    for _ in range(2):
      f(a).block_until_ready()
  rows = summary.summarize(tmp_path, top=10, steps=2)
  assert rows and all(r["ms_per_step"] > 0 and 0 < r["share"] <= 1 for r in rows)
  assert all(r["thread"].startswith("/host:CPU tf_XLA") for r in rows)  # CPU: the XLA threads, not python
  assert "| thread | op |" in summary.render(rows)


def test_small_decode_run_prints_every_row(tmp_path):
  """benchmarks/decode.py --small: transformers and the llava_jax rows (fused, flash-decoding kernel with an
  explicit split) in one table, and the kernel's on-device check against XLA attention."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, str(SCRIPT.parent / "decode.py"), "--small", "--batch_sizes=1",
                         "--new_tokens=12", "--repeats=1", "--unfused_row=false", "--pallas_rows=2"], env=env, capture_output=True, text=True, timeout=400,
                        cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [line.split(" | ")[0].lstrip("| ") for line in proc.stdout.splitlines() if line.startswith("| ")]
  assert rows == ["impl", "transformers", "llava_jax", "llava_jax pallas/2"], proc.stdout
  for line in proc.stdout.splitlines():
    if line.startswith("| llava_jax"):
      assert float(line.split(" | ")[4]) > 0 and line.split(" | ")[7].endswith("x"), line  # tok/s, vs HF
  check = next(line for line in proc.stdout.splitlines() if line.startswith("pallas kernel vs XLA"))
  assert float(check.split("max |difference| ")[1].split(",")[0]) < 1e-5, check


_DECODE_VARIANT_CHECK = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("decode_benchmark", sys.argv[1])
decode = importlib.util.module_from_spec(spec)
spec.loader.exec_module(decode)
variants = decode.parse_variants(["cublas:--xla_gpu_enable_triton_gemm=false", "two:--a=1 --b=2",
                                  "three:--a=1,--c=X,Y"])
runs = decode.part_runs(variants, [1, 16], ["auto", "4"], True, "/p")
refused = []
for bad in (["nocolon"], ["x:"], ["x:--a=1", "x:--b=2"]):
  try:
    decode.parse_variants(bad)
  except decode.app.UsageError:
    refused.append(bad)
row = lambda tok_s: {"decode_tok_s": tok_s}
results = {"hf": {"batches": {"1": row(1), "16": row(2)}},
           "jax": {"batches": {"1": row(3), "16": row(4), "1unfused": row(5), "1pallas": row(6), "16pallas": row(7)}},
           "jax [cublas]": {"batches": {"1": row(8), "1pallas": row(9)}}}
kinds = [k for _, k in decode._row_kinds([1, 16], True, ["auto"]) if k]
table = [(name, batch, res[key]["decode_tok_s"]) for name, res, batch, key in decode.table_rows(results, [1, 16], kinds)]
print(json.dumps(dict(variants=variants, runs=runs, refused=refused, table=table)))
"""


def test_decode_variants_run_in_their_own_processes_and_rows():
  """decode.py --jax_variant: each NAME:XLA_FLAGS is one more llava_jax process (first batch size, the default
  pallas row, no profile) whose rows follow llava_jax's in the table; malformed or repeated names are refused."""
  proc = subprocess.run([sys.executable, "-c", _DECODE_VARIANT_CHECK, str(SCRIPT.parent / "decode.py")],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.splitlines()[-1])
  assert got["variants"] == {"cublas": "--xla_gpu_enable_triton_gemm=false", "two": "--a=1 --b=2",
                             "three": "--a=1 --c=X,Y"}
  assert len(got["refused"]) == 3
  names = [(name, xla_flags) for name, _, xla_flags, _ in got["runs"]]
  assert names == [("hf", ""), ("jax", ""), ("jax [cublas]", "--xla_gpu_enable_triton_gemm=false"),
                   ("jax [two]", "--a=1 --b=2"), ("jax [three]", "--a=1 --c=X,Y")]
  main, variant = got["runs"][1][3], got["runs"][2][3]
  assert main == dict(unfused_row=True, pallas_rows="auto,4", profile_dir="/p", batch_sizes="1,16")
  assert variant == dict(unfused_row=False, pallas_rows="auto", profile_dir=None, batch_sizes="1")
  assert got["table"] == [["transformers", 1, 1], ["llava_jax", 1, 3], ["llava_jax unfused", 1, 5],
                          ["llava_jax pallas", 1, 6], ["llava_jax [cublas]", 1, 8], ["llava_jax [cublas] pallas", 1, 9],
                          ["transformers", 16, 2], ["llava_jax", 16, 4], ["llava_jax pallas", 16, 7]]
