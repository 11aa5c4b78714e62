"""Streaming conversion benchmark: a synthetic sharded llava-hf checkpoint of >= 3 GB through `convert from-hf`
(and back through `to-hf`), against a plain read of the same files; wall time and peak memory of each.

  python benchmarks/convert_streaming.py [--dir /tmp/llava_convert_bench] [--layers 24] [--keep]

The checkpoint has llava-hf's on-disk key names (as on the Hub), a ViT-L/14-336 tower and projector in float32
and a 2048-wide LLaMA in bfloat16, in ~1 GB safetensors shards with `model.safetensors.index.json`. Each step runs
in its own Python process; peak memory is reported two ways: `ru_maxrss` (peak resident set, which also counts
pages of memory-mapped files) and the peak of `RssAnon` sampled every 20 ms (memory the process itself
allocated). All runs read files that were just written (warm page cache). The files are deleted at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

GB = 1e9


def synthetic_config(layers: int):
  import transformers
  vision = transformers.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                         num_attention_heads=16, image_size=336, patch_size=14,
                                         hidden_act="quick_gelu")
  text = transformers.LlamaConfig(vocab_size=32064, hidden_size=2048, intermediate_size=5504,
                                  num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
                                  max_position_embeddings=4096, pad_token_id=32001)
  return transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000,
                                  image_seq_length=576)


def hub_name(key: str) -> str:
  """transformers 5 in-memory LLaVA names -> the llava-hf names on the Hub."""
  for new, old in (("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."
                   "vision_model."), ("model.multi_modal_projector.", "multi_modal_projector."),
                   ("lm_head.", "language_model.lm_head.")):
    if key.startswith(new):
      return old + key[len(new):]
  raise KeyError(key)


def write_checkpoint(folder: pathlib.Path, layers: int, shard_bytes: int = int(1 * GB)) -> int:
  """Random tensors with the model's names and shapes, written one shard at a time. Returns total bytes."""
  import ml_dtypes
  import torch
  import transformers
  from safetensors.numpy import save_file
  config = synthetic_config(layers)
  with torch.device("meta"):
    shapes = {hub_name(k): tuple(v.shape) for k, v in transformers.LlavaForConditionalGeneration(config)
              .state_dict().items()}
  config.save_pretrained(folder)
  rng = np.random.default_rng(0)
  shard, size, total, names, weight_map = {}, 0, 0, [], {}

  def flush():
    nonlocal shard, size
    name = f"model-{len(names) + 1:05d}.safetensors"
    save_file(shard, str(folder / name), metadata={"format": "pt"})
    names.append((name, list(shard)))
    shard, size = {}, 0

  for key, shape in shapes.items():
    dtype = ml_dtypes.bfloat16 if key.startswith("language_model.") else np.float32
    array = (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
    if shard and size + array.nbytes > shard_bytes:
      flush()
    shard[key] = array
    size += array.nbytes
    total += array.nbytes
  flush()
  for i, (name, keys) in enumerate(names):
    final = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
    os.replace(folder / name, folder / final)
    weight_map.update({k: final for k in keys})
  (folder / "model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {"total_size": total}, "weight_map": weight_map}))
  return total


_PLAIN_READ = """
import json, pathlib, sys
import ml_dtypes  # bfloat16 for numpy
from safetensors import safe_open
folder = pathlib.Path(sys.argv[1])
n = 0
for name in sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())):
  with safe_open(str(folder / name), framework="np") as f:
    for key in f.keys():
      n += f.get_tensor(key).nbytes
print("bytes read", n)
"""

_CONVERT = """
import sys
from llava_jax import convert
sys.exit(convert.main(sys.argv[1:]))
"""


def _rss_anon_kb(pid: int) -> int:
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("RssAnon:"):
          return int(line.split()[1])
  except (FileNotFoundError, ProcessLookupError):
    pass
  return 0


def measure(name: str, code: str, *args: str) -> dict:
  """Runs `code` in a fresh interpreter; wall time, peak ru_maxrss and peak sampled RssAnon."""
  wrapper = (f"import resource, sys\nsys.argv = [''] + {list(args)!r}\ntry:\n"
             + "".join("  " + line + "\n" for line in code.strip().splitlines())
             + "finally:\n  print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  start = time.time()
  proc = subprocess.Popen([sys.executable, "-c", wrapper], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=env)
  peak_anon = [0]

  def sample():
    while proc.poll() is None:
      peak_anon[0] = max(peak_anon[0], _rss_anon_kb(proc.pid))
      time.sleep(0.02)

  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  out, _ = proc.communicate()
  wall = time.time() - start
  sampler.join()
  if proc.returncode != 0:
    raise RuntimeError(f"{name} failed ({proc.returncode}):\n{out}")
  maxrss = int(out.rsplit("MAXRSS_KB", 1)[1].split()[0]) * 1024
  for line in out.splitlines():
    if line.startswith("wrote "):
      print(f"  [{name}] {line}")
  return {"step": name, "wall_s": wall, "peak_rss_gb": maxrss / GB, "peak_anon_gb": peak_anon[0] * 1024 / GB}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dir", default=None, help="work folder (default: a new folder in the temp dir)")
  parser.add_argument("--layers", type=int, default=24, help="LLM layers (24 -> 3.9 GB of source files)")
  parser.add_argument("--keep", action="store_true", help="keep the files")
  args = parser.parse_args()
  work = pathlib.Path(args.dir or tempfile.mkdtemp(prefix="llava_convert_bench_"))
  work.mkdir(parents=True, exist_ok=True)
  src, out, hf = work / "src", work / "model", work / "hf"
  try:
    src.mkdir()
    start = time.time()
    total = write_checkpoint(src, args.layers)
    shards = len(list(src.glob("*.safetensors")))
    print(f"synthetic checkpoint: {total / GB:.2f} GB in {shards} shards + index ({time.time() - start:.0f}s)")
    from safetensors import safe_open
    largest = 0
    for f in src.glob("*.safetensors"):
      with safe_open(str(f), framework="np") as h:
        for k in h.keys():
          piece = h.get_slice(k)
          largest = max(largest, int(np.prod(piece.get_shape())) * {"BF16": 2, "F32": 4}[piece.get_dtype()])
    rows = [measure("plain read (safe_open, every tensor)", _PLAIN_READ, str(src)),
            measure("from-hf --dtype bfloat16", _CONVERT, "from-hf", str(src), "--output", str(out),
                    "--dtype", "bfloat16"),
            measure("to-hf --max-shard-size 1GB", _CONVERT, "to-hf", str(out), "--output", str(hf),
                    "--max-shard-size", "1GB")]
    out_bytes = sum(p.stat().st_size for p in (out / "params").rglob("*") if p.is_file())
    print(f"output params (bf16): {out_bytes / GB:.2f} GB on disk; largest source tensor {largest / GB:.3f} GB")
    print(f"{'step':40s} {'wall s':>8s} {'peak RSS GB':>12s} {'peak RssAnon GB':>16s}")
    for r in rows:
      print(f"{r['step']:40s} {r['wall_s']:8.1f} {r['peak_rss_gb']:12.2f} {r['peak_anon_gb']:16.2f}")
    print(f"from-hf / plain read wall time: {rows[1]['wall_s'] / rows[0]['wall_s']:.2f}x")
  finally:
    if not args.keep:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
