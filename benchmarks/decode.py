r"""Decode tokens/s: `llava_jax.generate.Engine` against transformers' `generate`, in the same run.

LLaVA-1.5-7B shapes (CLIP ViT-L/14-336, mlp2x_gelu, LLaMA-7B with llava-hf's 32064 vocabulary), random weights,
bf16 on GPU (float32 on CPU). Every prompt is BOS + one image (576 positions) + 39 text tokens: 576 image + 40
text positions. Greedy, EOS ignored, so every row decodes exactly --new_tokens tokens.

Measured, each the best of --repeats after a warm-up (excluded); every timing ends with `block_until_ready`
(JAX) or `torch.cuda.synchronize` (PyTorch):
- prefill: the prompt through the vision tower and the LLM, and the first token;
- prefill + 8: the time to the first 9 tokens (prefill + 8 decode steps);
- decode tokens/s: batch x (new_tokens - 9) / the time of decode steps 9 .. new_tokens
  (JAX: one on-device loop call; transformers: generate(new_tokens) - generate(9), the same prefill in both);
- compile: JAX's first call minus a warm call (prefill and decode programs), per batch size;
- peak GB: the device's peak memory in the side's process (JAX: includes the transient second copy of the LLM
  layers made when the engine unstacks them);
- the memory-bandwidth bound: batch / (LLM weight bytes / copy bandwidth), the copy bandwidth measured with a
  jitted `x * 2` over a 4 GB array (bytes read + written), 10 calls per timing.
Each side runs in a child process of its own (transformers first, then JAX), so the two CUDA stacks and
allocators never share a process; the parent prints the table.

  python benchmarks/decode.py                  # GPU, 7B shapes, batches 1 and 16
  python benchmarks/decode.py --small          # tiny shapes, runs on CPU in a minute
  python benchmarks/decode.py --batch_sizes=1 --jax_variant=cublas:--xla_gpu_enable_triton_gemm=false
                                               # + rows of llava_jax in a process with other XLA flags
"""
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from llava_jax import generate  # noqa: E402
from llava_jax.models.config import IMAGE_TOKEN_INDEX, ModelConfig, RuntimeConfig, TextConfig, VisionConfig  # noqa: E402
from llava_jax.models.llava import LlavaModel  # noqa: E402

_SMALL = flags.DEFINE_bool("small", False, "Tiny shapes (CPU-friendly) instead of LLaVA-7B.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "16"], "Batch sizes.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", None, "Tokens decoded per row (default 128; --small 32).")
_TEXT_TOKENS = flags.DEFINE_integer("text_tokens", 40, "Text tokens of the prompt (BOS included).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions; the best is reported.")
_DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "bfloat16", "float32"], "auto: bf16 on GPU, fp32 on CPU.")
_SKIP_HF = flags.DEFINE_bool("skip_hf", False, "Do not run transformers.")
_SKIP_JAX = flags.DEFINE_bool("skip_jax", False, "Do not run llava_jax.")
_UNFUSED = flags.DEFINE_bool("unfused_row", True, "Also time llava_jax at batch 1 without fused q/k/v and gate/up "
                              "projections (Engine(fuse_projections=False)).")
_PALLAS_ROWS = flags.DEFINE_list("pallas_rows", ["auto", "4"], "Also time llava_jax with decode_attention='pallas' "
                                  "(JAX's flash-decoding kernel) and these k_splits ('auto' = the default split, "
                                  "at every batch size; a number: at the first batch size). Empty: none.")
_VARIANTS = flags.DEFINE_multi_string("jax_variant", [], "NAME:XLA_FLAGS, repeatable: llava_jax runs again at the "
                                      "first batch size in a process with XLA_FLAGS added (rows 'llava_jax [NAME]', "
                                      "and '... pallas' when --pallas_rows has 'auto'). Several flags: separated "
                                      "by spaces, or by commas before '--'.")
_PROFILE_DIR = flags.DEFINE_string("profile_dir", None, "Trace 16 decode steps of llava_jax at the first batch size "
                                   "into DIR (jax.profiler; also DIR/pallas for the first --pallas_rows row) and "
                                   "print the busiest device ops.")
_DEADLINE_S = flags.DEFINE_float("deadline_s", None, "Print the table by this many seconds after the start: a child "
                                 "process still running then is stopped (its rows are missing), and one that would "
                                 "start with under 30 s left is skipped.")
_PART = flags.DEFINE_enum("part", "", ["", "hf", "jax"], "Internal: run one side and write --result_file.")
_RESULT_FILE = flags.DEFINE_string("result_file", None, "Internal: where a part writes its JSON results.")

IMAGE_TOKEN = 32000  # llava-hf's '<image>' id (vocabulary 32064)


def model_config(small: bool) -> ModelConfig:
  if small:
    return ModelConfig(
        vision=VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            image_size=56, patch_size=14),
        text=TextConfig(vocab_size=32064, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024),
        image_token_id=IMAGE_TOKEN)
  return ModelConfig(text=TextConfig(vocab_size=32064), image_token_id=IMAGE_TOKEN)


def hf_config(cfg: ModelConfig):
  import transformers
  v, t = cfg.vision, cfg.text
  return transformers.LlavaConfig(
      vision_config=transformers.CLIPVisionConfig(
          hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
          num_attention_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size,
          projection_dim=768, hidden_act="quick_gelu"),
      text_config=transformers.LlamaConfig(
          vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
          num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
          num_key_value_heads=t.num_key_value_heads, max_position_embeddings=t.max_position_embeddings,
          rms_norm_eps=t.rms_norm_eps),
      image_token_index=IMAGE_TOKEN, vision_feature_layer=cfg.vision_feature_layer,
      vision_feature_select_strategy="default", projector_hidden_act="gelu", image_seq_length=cfg.image_seq_length)


def prompts(cfg: ModelConfig, batch: int, text_tokens: int, seed: int = 0):
  """(ids int32[B, text_tokens + 1] with one IMAGE_TOKEN_INDEX after BOS, images float32[B, S, S, 3])."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, 31999, (batch, text_tokens + 1)).astype(np.int32)
  ids[:, 0], ids[:, 1] = 1, IMAGE_TOKEN_INDEX
  s = cfg.vision.image_size
  return ids, rng.randn(batch, s, s, 3).astype(np.float32)


def llm_weight_bytes(cfg: ModelConfig, itemsize: int) -> int:
  """Bytes of all LLM weights, the embedding table included: the bound of performance.md (13.48 GB for 7B).
  A step reads only B rows of the table, so a bound without it (13.22 GB) would be ~2% higher."""
  t = cfg.text
  per_layer = (t.hidden_size * t.head_size * (2 * t.num_attention_heads + 2 * t.num_key_value_heads)
               + 3 * t.hidden_size * t.intermediate_size + 2 * t.hidden_size)
  return itemsize * (t.num_hidden_layers * per_layer + 2 * t.vocab_size * t.hidden_size + t.hidden_size)


def copy_bandwidth(dtype, n_bytes: int, iters: int = 10) -> float:
  """Bytes/s of a jitted `x * 2` (n_bytes read + n_bytes written): `iters` calls back to back, one sync at the
  end (so the host's dispatch and sync cost is spread thin), best of 5. (float32: bf16 arithmetic is emulated on
  CPU; on GPU the dtype makes no difference to a copy.)"""
  x = jnp.ones((n_bytes // jnp.dtype(dtype).itemsize,), dtype)
  f = jax.jit(lambda a: a * 2)
  f(x).block_until_ready()
  best = float("inf")
  for _ in range(5):
    t0 = time.perf_counter()
    for _ in range(iters):
      y = f(x)
    y.block_until_ready()
    best = min(best, (time.perf_counter() - t0) / iters)
  del x, y
  return 2 * n_bytes / best


def best_of(fn, repeats):
  """Smallest result of `repeats` calls (elementwise for tuples)."""
  results = [fn() for _ in range(repeats)]
  if isinstance(results[0], tuple):
    return tuple(min(r[i] for r in results) for i in range(len(results[0])))
  return min(results)


# --- transformers ---------------------------------------------------------------------------------------------


def run_hf(cfg: ModelConfig, batches, new_tokens, text_tokens, dtype_name, repeats):
  import torch
  import transformers
  device = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = getattr(torch, dtype_name)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  t0 = time.perf_counter()
  with torch.device(device):
    model = transformers.LlavaForConditionalGeneration._from_config(hf_config(cfg), dtype=dtype,
                                                                     attn_implementation="sdpa").eval()
  print(f"transformers {transformers.__version__}, torch {torch.__version__}, {device}, init "
        f"{time.perf_counter() - t0:.1f} s", flush=True)
  n_img = cfg.image_seq_length
  results = {}
  for batch in batches:
    ids, images = prompts(cfg, batch, text_tokens)
    expanded = np.concatenate([ids[:, :1], np.full((batch, n_img), IMAGE_TOKEN), ids[:, 2:]], axis=1)
    input_ids = torch.from_numpy(expanded.astype(np.int64)).to(device)
    mask = torch.ones_like(input_ids)
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2)).to(device, dtype)

    def timed(n):
      sync()
      t0 = time.perf_counter()
      with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, num_beams=1, pad_token_id=0)
      sync()
      assert out.shape[1] == input_ids.shape[1] + n, out.shape
      return time.perf_counter() - t0

    if device == "cuda":
      torch.cuda.reset_peak_memory_stats()
    timed(2)  # warm-up
    prefill = best_of(lambda: timed(1), repeats)
    first9 = best_of(lambda: timed(9), repeats)
    full = best_of(lambda: timed(new_tokens), repeats)
    results[batch] = dict(prefill_s=prefill, first9_s=first9,
                          decode_tok_s=batch * (new_tokens - 9) / max(full - first9, 1e-9),
                          peak_gb=torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None)
    print(f"  hf batch {batch}: {results[batch]}", flush=True)
  return results


# --- llava_jax ------------------------------------------------------------------------------------------------


def _row_kinds(batches, unfused_row, pallas_rows):
  """(batch, kind) runs: kind '' = the default engine, 'unfused', 'pallas' (default split) or 'pallas/K'."""
  runs = [(b, "") for b in batches] + ([(min(batches), "unfused")] if unfused_row else [])
  for spec in pallas_rows:
    if spec == "auto":
      runs += [(b, "pallas") for b in batches]
    else:
      runs.append((min(batches), f"pallas/{int(spec)}"))
  return runs


def run_jax(cfg: ModelConfig, batches, new_tokens, text_tokens, dtype_name, repeats, unfused_row=False,
            profile_dir=None, pallas_rows=()):
  t0 = time.perf_counter()
  runtime = RuntimeConfig(param_dtype=dtype_name, dtype=dtype_name)
  model = nnx.jit(lambda: LlavaModel(cfg, runtime, rngs=nnx.Rngs(0)))()
  jax.block_until_ready(nnx.state(model))
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, init {time.perf_counter() - t0:.1f} s, "
        f"attention: vision {getattr(model.vision_tower.layers.self_attn, 'implementation', '?')}, "
        "LLM (masked) xla", flush=True)
  engines = {"": generate.Engine(model)}  # runs a copy with unstacked (and fused) LLM layers
  if unfused_row:
    engines["unfused"] = generate.Engine(model, fuse_projections=False)
  del model  # frees the stacked layer arrays
  params = generate.SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
  results = {}
  runs = _row_kinds(batches, unfused_row, pallas_rows)
  profiled = set()
  for batch, kind in runs:
    engine = engines["unfused" if kind == "unfused" else ""]
    key = f"{batch}{kind}"
    if kind.startswith("pallas"):  # the same engine and weights, another attention in its decode program
      engine.set_decode_attention("pallas", int(kind.split("/")[1]) if "/" in kind else None)
    else:
      engine.set_decode_attention("xla")
    ids, images = prompts(cfg, batch, text_tokens)
    requests = [generate.Request(ids[i], images[i:i + 1]) for i in range(batch)]

    def timed():
      """-> (prefill s, prefill + 8 s, decode s of steps 9..new_tokens)."""
      t0 = time.perf_counter()
      ds, _ = engine.start(requests, params)
      jax.block_until_ready(ds)
      t1 = time.perf_counter()
      ds = engine.advance(ds, params, 9)
      jax.block_until_ready(ds)
      t2 = time.perf_counter()
      ds = engine.advance(ds, params, new_tokens)
      jax.block_until_ready(ds)
      t3 = time.perf_counter()
      assert int(ds.step) == new_tokens, int(ds.step)
      return t1 - t0, t2 - t0, t3 - t2

    try:
      first = timed()  # compiles
      prefill, first9, decode = best_of(timed, repeats)
    except Exception as e:  # pylint: disable=broad-except  (a kernel that fails to build loses one row only)
      if not kind.startswith("pallas"):
        raise
      results[key] = dict(error=f"{type(e).__name__}: {e}"[:300])
      print(f"  jax batch {key}: {results[key]}", flush=True)
      continue
    stats = jax.devices()[0].memory_stats() or {}
    results[key] = dict(prefill_s=prefill, first9_s=first9,
                        decode_tok_s=batch * (new_tokens - 9) / decode,
                        compile_s=(first[1] + first[2]) - (first9 + decode),
                        peak_gb=stats["peak_bytes_in_use"] / 1e9 if "peak_bytes_in_use" in stats else None)
    print(f"  jax batch {key}: {results[key]}", flush=True)
    family = kind.split("/")[0]
    if profile_dir and batch == min(batches) and family in ("", "pallas") and family not in profiled:
      profiled.add(family)
      name = "profile_pallas" if family else "profile"
      results[name] = _profile_decode(engine, requests, params, os.path.join(profile_dir, family or "xla"),
                                      steps=16, title=f"llava_jax{' ' + kind if kind else ''}")
  if pallas_rows:
    cache_len = generate.bucket(cfg.image_seq_length + text_tokens) + generate.bucket(new_tokens)  # the engine's
    results["kernel_check"] = _kernel_check(cfg, dtype_name, cache_len)
  return results


def _kernel_check(cfg: ModelConfig, dtype_name: str, slots: int) -> str:
  """The flash-decoding kernel against the XLA attention on one layer's random q and cache (7B: 32 heads,
  `slots` slots, the window [24, slots - 40)), in the benchmark's dtype: the largest difference."""
  from llava_jax.models import cache_attention  # pylint: disable=g-import-not-at-top
  t = cfg.text
  dtype = jnp.dtype(dtype_name)
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (1, 1, t.num_attention_heads, t.head_size), dtype)
  k, v = (jax.random.normal(key, (1, t.num_key_value_heads, slots, t.head_size), dtype) for key in (kk, kv))
  start, stop = jnp.asarray([24], jnp.int32), jnp.int32(slots - 40)
  try:
    got = jax.jit(lambda q, k, v: cache_attention.attend_window(q, k, v, cache_attention.SlotWindow(start, stop))
                  )(q, k, v)
    mask = ((jnp.arange(slots) >= 24) & (jnp.arange(slots) < slots - 40))[None, None, None, :]
    want = jax.jit(cache_attention.attend)(q, k, v, mask)
    err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
    scale = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
    return (f"pallas kernel vs XLA attention ({dtype_name}, {t.num_attention_heads} heads, {slots} slots): "
            f"max |difference| {err:.2e}, max |output| {scale:.2e}")
  except Exception as e:  # pylint: disable=broad-except
    return f"pallas kernel check failed: {type(e).__name__}: {e}"[:300]


def _profile_decode(engine, requests, params, trace_dir: str, steps: int, title: str) -> str:
  """Traces `steps` decode steps (after the prefill and 9 tokens) -> the busiest device ops as a table."""
  import trace_summary  # pylint: disable=g-import-not-at-top  (next to this script)
  try:
    ds, _ = engine.start(requests, params)
    ds = jax.block_until_ready(engine.advance(ds, params, 9))
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      ds = jax.block_until_ready(engine.advance(ds, params, 9 + steps))
    rows = trace_summary.summarize(trace_dir, top=25, steps=steps)
    return trace_summary.render(rows, f"### {title} decode, batch {len(requests)}: busiest device ops per token")
  except Exception as e:  # pylint: disable=broad-except  (the timings stand without it)
    return f"profile failed: {type(e).__name__}: {e}"[:300]


def run_part(part: str, cfg: ModelConfig, batches, new_tokens) -> dict:
  """One side in this process: {'batches': {batch: results}, 'dtype': ..., ...}. The transformers side never
  initialises a JAX backend (so only PyTorch's CUDA libraries load in its process)."""
  if part == "hf":
    import torch
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not _SMALL.value:
      raise SystemExit("transformers: torch sees no GPU (CPU-only torch?); not running 7B shapes on CPU. "
                       "Use --skip_hf, --small, or a CUDA build of torch.")
    dtype = _DTYPE.value if _DTYPE.value != "auto" else ("bfloat16" if on_gpu else "float32")
    return {"batches": run_hf(cfg, batches, new_tokens, _TEXT_TOKENS.value, dtype, _REPEATS.value),
            "dtype": dtype}
  dtype = _DTYPE.value if _DTYPE.value != "auto" else ("float32" if jax.default_backend() == "cpu" else "bfloat16")
  backend = jax.default_backend()
  out = {"batches": run_jax(cfg, batches, new_tokens, _TEXT_TOKENS.value, dtype, _REPEATS.value, _UNFUSED.value,
                           _PROFILE_DIR.value, _PALLAS_ROWS.value)}
  out["profiles"] = [out["batches"].pop(k) for k in ("profile", "profile_pallas") if k in out["batches"]]
  out["kernel_check"] = out["batches"].pop("kernel_check", None)
  out["bandwidth"] = copy_bandwidth(jnp.float32, (256 << 20) if backend == "cpu" else (4 << 30))
  out["device"] = jax.devices()[0].device_kind
  out["dtype"] = dtype
  return out


def parse_variants(values) -> dict[str, str]:
  """--jax_variant values 'NAME:XLA_FLAGS' -> {NAME: XLA_FLAGS}; flags are separated by spaces or by a comma
  before '--' (so a variant of several flags fits in one shell word)."""
  variants = {}
  for value in values:
    name, sep, xla_flags = value.partition(":")
    words = [w for w in re.split(r"\s+|,(?=--)", xla_flags) if w]
    if not sep or not name or not words or name in variants:
      raise app.UsageError(f"--jax_variant wants NAME:XLA_FLAGS with a new NAME, got {value!r}")
    variants[name] = " ".join(words)
  return variants


def part_runs(variants: dict[str, str], batches, pallas_rows, unfused_row: bool, profile_dir):
  """The child processes: (result name, part, extra XLA_FLAGS, part flags) each. A variant runs the first batch
  size only, with the default pallas row ('auto') if the main run has it, and no profile."""
  common = dict(unfused_row=unfused_row, pallas_rows=",".join(pallas_rows), profile_dir=profile_dir,
                batch_sizes=",".join(map(str, batches)))
  runs = [("hf", "hf", "", common), ("jax", "jax", "", common)]
  for name, xla_flags in variants.items():
    runs.append((f"jax [{name}]", "jax", xla_flags,
                 dict(unfused_row=False, pallas_rows="auto" if "auto" in pallas_rows else "", profile_dir=None,
                      batch_sizes=str(batches[0]))))
  return runs


def table_rows(results: dict, batches, kinds) -> list[tuple[str, dict, int, str]]:
  """(row name, the results it comes from, batch, key in them) in table order: per batch size, transformers,
  llava_jax and its kinds, then each variant (and its pallas row)."""
  hf = {int(k): v for k, v in results.get("hf", {}).get("batches", {}).items()}
  rows = []
  for batch in batches:
    rows.append(("transformers", hf, batch, batch))
    ours = results.get("jax", {}).get("batches", {})
    rows += [(f"llava_jax{' ' + kind if kind else ''}", ours, batch, f"{batch}{kind}")
             for kind in dict.fromkeys(["", *kinds])]
    for name, res in results.items():
      if name.startswith("jax ["):
        rows += [(f"llava_{name}{' ' + kind if kind else ''}", res.get("batches", {}), batch, f"{batch}{kind}")
                 for kind in ("", "pallas")]
  return [row for row in rows if row[3] in row[1]]


def main(argv):
  del argv
  small = _SMALL.value
  cfg = model_config(small)
  new_tokens = _NEW_TOKENS.value or (32 if small else 128)
  if new_tokens <= 9:
    raise app.UsageError("--new_tokens must be > 9")
  batches = [int(b) for b in _BATCH_SIZES.value]
  variants = parse_variants(_VARIANTS.value)
  if _PART.value:
    result = run_part(_PART.value, cfg, batches, new_tokens)
    with open(_RESULT_FILE.value, "w") as f:
      json.dump(result, f)
    return

  print(f"shapes: {'small' if small else 'LLaVA-7B'}; prompt {cfg.image_seq_length} image + {_TEXT_TOKENS.value} "
        f"text positions; {new_tokens} new tokens; dtype {_DTYPE.value}", flush=True)
  # Each side in its own process: PyTorch and JAX each load their own CUDA libraries (cuDNN versions may
  # differ) and allocators, and a side's failure does not lose the other's numbers. XLA flags are read once per
  # process, so each variant gets one too.
  results = {}
  start = time.perf_counter()
  for name, part, xla_flags, part_flags in part_runs(variants, batches, _PALLAS_ROWS.value, _UNFUSED.value,
                                                     _PROFILE_DIR.value):
    if (_SKIP_HF.value if part == "hf" else _SKIP_JAX.value):
      continue
    left = None if _DEADLINE_S.value is None else _DEADLINE_S.value - (time.perf_counter() - start)
    if left is not None and left < 30:
      print(f"[{name}: skipped, {left:.0f} s left before --deadline_s]", flush=True)
      continue
    env = dict(os.environ)
    if xla_flags:
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "result.json")
      argv = [sys.executable, os.path.abspath(__file__), f"--part={part}", f"--result_file={path}",
              f"--small={small}", f"--batch_sizes={part_flags['batch_sizes']}", f"--new_tokens={new_tokens}",
              f"--text_tokens={_TEXT_TOKENS.value}", f"--repeats={_REPEATS.value}", f"--dtype={_DTYPE.value}",
              f"--unfused_row={part_flags['unfused_row']}", f"--pallas_rows={part_flags['pallas_rows']}",
              *([f"--profile_dir={part_flags['profile_dir']}"] if part_flags["profile_dir"] else [])]
      t0 = time.perf_counter()
      try:
        rc = subprocess.run(argv, check=False, env=env, timeout=left).returncode
      except subprocess.TimeoutExpired:  # the child is killed; the rows so far still print
        rc = "timeout (--deadline_s)"
      print(f"[{name}: exit {rc}, {time.perf_counter() - t0:.0f} s wall]", flush=True)
      if rc == 0:
        with open(path) as f:
          results[name] = json.load(f)
  if not results:
    raise SystemExit("no side produced results")
  hf = {int(k): v for k, v in results.get("hf", {}).get("batches", {}).items()}
  bandwidth = results.get("jax", {}).get("bandwidth")
  dtype = next(r["dtype"] for r in results.values())
  weights = llm_weight_bytes(cfg, jnp.dtype(dtype).itemsize)
  step_bound_s = weights / bandwidth if bandwidth else None

  print(f"\ndevice: {results.get('jax', {}).get('device', '?')}; LLM weights {weights / 1e9:.3f} GB ({dtype})")
  if bandwidth:
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s -> bound at batch 1: {1 / step_bound_s:.1f} tokens/s "
          "(weights only; KV cache reads not counted); batch B: B x that")
  header = ("| impl | batch | prefill s | prefill + 8 tok s | decode tok/s | steps/s | % of bound | vs HF | "
            "compile s | peak GB |")
  print(header)
  print("|---" * (header.count("|") - 1) + "|")
  fmt = lambda v, spec, unit="": "" if v is None else format(v, spec) + unit
  kinds = [kind for _, kind in _row_kinds(batches, _UNFUSED.value, _PALLAS_ROWS.value) if kind]
  rows = table_rows(results, batches, kinds)
  for name, res, batch, key in rows:
    r = res[key]
    if "error" in r:
      print(f"| {name} | {batch} | failed: {r['error'][:200]} |" + " |" * 7)
      continue
    share = r["decode_tok_s"] * step_bound_s / batch if step_bound_s else None
    vs = (r["decode_tok_s"] / hf[batch]["decode_tok_s"]) if name != "transformers" and batch in hf else None
    print(f"| {name} | {batch} | {r['prefill_s']:.3f} | {r['first9_s']:.3f} | {r['decode_tok_s']:.1f} | "
          f"{r['decode_tok_s'] / batch:.1f} | {fmt(share and 100 * share, '.0f', '%')} | {fmt(vs, '.2f', 'x')} | "
          f"{fmt(r.get('compile_s'), '.1f')} | {fmt(r.get('peak_gb'), '.1f')} |")
  for name, xla_flags in variants.items():
    print(f"llava_jax [{name}]: the llava_jax engine in a process with XLA_FLAGS += {xla_flags}")
  if any("pallas" in name for name, *_ in rows):
    print("llava_jax pallas: decode_attention='pallas' (JAX's Pallas flash-decoding kernel over the head-major "
          "cache); pallas/K: at most K parts of the cache per (row, kv head)")
    print(results.get("jax", {}).get("kernel_check") or "")
  for profile in results.get("jax", {}).get("profiles", []):
    print("\n" + profile)


if __name__ == "__main__":
  app.run(main)
