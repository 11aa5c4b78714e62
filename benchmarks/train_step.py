r"""Training-step benchmark: llava_jax's real train step against transformers' PyTorch LLaVA (the peer).

Cases of shared/spec/performance.md, random weights and data, bf16 parameters and compute, AdamW with bf16
moments, one device:

  stage1-7b        LLaMA-7B shapes, LLM + CLIP frozen, projector trained       16 x 640
  stage2-1b        TinyLlama-1.1B shapes (GQA 32/4), projector + LLM trained    8 x 2048
  stage2-7b        LLaMA-7B shapes, projector + LLM trained                     4 x 2048
  stage2-7b-remat  same, remat ('full' = gradient checkpointing on the peer)   8 x 2048

Every row has its image placeholder first (576 positions once expanded), then text tokens so that the expanded
row is exactly `seq` long; the loss is on the second half of the text. Each case runs in its own subprocess (so
peak memory is per case and an OOM or crash loses one row only): compile (lower + compile), `--warmup` steps,
then `--steps` timed steps with one synchronisation at the end. Every llava_jax worker also times an
8192^3 bf16 matmul in JAX (the peak the model TFLOP/s are compared with).

  python benchmarks/train_step.py --peer --out=/tmp/train_step.md        # GPU, all cases, ours and the peer
  python benchmarks/train_step.py --small --peer                         # tiny shapes on CPU (smoke test)
  python benchmarks/train_step.py --cases=stage2-7b --steps=10 --remat_policy=save_attn_out
  python benchmarks/train_step.py --peer --cases=stage2-1b --variant=noscan:scan_layers=0 \
      --variant=chunk2048:loss_chunk=2048   # extra llava_jax rows with other settings, same run

A --variant row is llava_jax with settings changed from the defaults: NAME:key=value,... with keys loss_chunk,
scan_layers, recompute_elementwise, remat_policy (also in cases without remat) and xla_flags (';' between flags,
added to XLA_FLAGS of that row's process).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
import traceback

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
from flax import nnx

_REPO = pathlib.Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
  sys.path.insert(0, str(_REPO))  # the GPU machine runs from a copy of the tree without `pip install -e`

# pylint: disable=g-import-not-at-top,wrong-import-position
from llava_jax import sharding
from llava_jax.models import layers
from llava_jax.models.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX, ModelConfig, RuntimeConfig, TextConfig
from llava_jax.models.config import VisionConfig
from llava_jax.models.llava import LlavaModel
from llava_jax.train import optim
from llava_jax.train.step import TrainState, make_train_step
# pylint: enable=g-import-not-at-top,wrong-import-position

_CASES = flags.DEFINE_list("cases", None, "Cases to run (default: all).")
_PEER = flags.DEFINE_bool("peer", False, "Also run transformers' LlavaForConditionalGeneration (PyTorch).")
_SMALL = flags.DEFINE_bool("small", False, "Tiny shapes (CPU smoke test).")
_STEPS = flags.DEFINE_integer("steps", None, "Timed steps (default 5, 2 with --small).")
_WARMUP = flags.DEFINE_integer("warmup", None, "Untimed steps after compilation (default 2, 1 with --small).")
_LOSS_CHUNK = flags.DEFINE_integer("loss_chunk", 1024, "Positions per logits chunk of the loss.")
_REMAT_POLICY = flags.DEFINE_string("remat_policy", "full", "llava_jax remat policy of the remat case.")
_ATTENTION = flags.DEFINE_string("attention_impl", "", "llava_jax attention: '' (cudnn on GPU), 'xla' or 'cudnn'.")
_PROFILE = flags.DEFINE_string("profile_dir", None, "llava_jax: trace --profile_steps more steps of each case "
                                "into DIR/CASE (jax.profiler, perfetto) and print its busiest device ops.")
_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 2, "Steps traced with --profile_dir.")
_as_bool = lambda v: v.lower() in ("1", "true", "yes")
VARIANT_KEYS = {"loss_chunk": int, "scan_layers": _as_bool, "recompute_elementwise": _as_bool, "remat_policy": str,
                "xla_flags": lambda v: v.replace(";", " ")}
_VARIANTS = flags.DEFINE_multi_string("variant", [], "Extra llava_jax rows per case: NAME:key=value,... "
                                       f"(keys: {', '.join(VARIANT_KEYS)}).")
_OUT = flags.DEFINE_string("out", None, "Also write the table as markdown here, and JSON next to it (.json).")
_TIMEOUT = flags.DEFINE_integer("timeout_s", 300, "Limit of one case subprocess.")
_DEADLINE = flags.DEFINE_integer("deadline_s", None, "Whole-run limit: cases that would start later are skipped.")
_MIN_CASE = flags.DEFINE_integer("min_case_s", 60, "With --deadline_s: a case needs at least this much left.")
# Worker mode (one case in this process; set by the driver).
_WORKER = flags.DEFINE_enum("worker", None, ["ours", "peer"], "Internal: run one case here.")
_RESULT = flags.DEFINE_string("result_file", None, "Internal: where the worker writes its JSON result.")
_OVERRIDES = flags.DEFINE_string("overrides", "{}", "Internal: JSON settings of a --variant row.")


def parse_variant(text: str) -> tuple[str, dict]:
  """'NAME:key=value,...' -> (NAME, {key: typed value}); raises ValueError naming what is wrong."""
  name, _, body = text.partition(":")
  if not name or not body:
    raise ValueError(f"--variant {text!r}: expected NAME:key=value,...")
  settings = {}
  for item in body.split(","):
    key, eq, value = item.partition("=")
    if not eq or key not in VARIANT_KEYS:
      raise ValueError(f"--variant {text!r}: {item!r} is not key=value with a key in {sorted(VARIANT_KEYS)}")
    settings[key] = VARIANT_KEYS[key](value)
  return name, settings

LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32)
TINYLLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                    num_attention_heads=32, num_key_value_heads=4)
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14)
TINY_TEXT = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4)
TINY_TEXT_GQA = dict(TINY_TEXT, num_key_value_heads=2)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   image_size=56, patch_size=14)


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  stage: int  # 1: projector trained; 2: projector + LLM trained
  batch: int
  seq: int  # expanded length of every row (image positions included)
  text: dict
  vision: dict
  remat: bool = False

  @property
  def image_tokens(self) -> int:
    return (self.vision["image_size"] // self.vision["patch_size"]) ** 2


CASES = {c.name: c for c in [
    Case("stage1-7b", 1, 16, 640, LLAMA_7B, CLIP_L_336),
    Case("stage2-1b", 2, 8, 2048, TINYLLAMA_1B, CLIP_L_336),
    Case("stage2-7b", 2, 4, 2048, LLAMA_7B, CLIP_L_336),
    Case("stage2-7b-remat", 2, 8, 2048, LLAMA_7B, CLIP_L_336, remat=True),
]}
SMALL_CASES = {c.name: c for c in [
    Case("stage1-7b", 1, 4, 24, TINY_TEXT, TINY_VISION),
    Case("stage2-1b", 2, 2, 32, TINY_TEXT_GQA, TINY_VISION),
    Case("stage2-7b", 2, 2, 32, TINY_TEXT, TINY_VISION),
    Case("stage2-7b-remat", 2, 4, 32, TINY_TEXT, TINY_VISION, remat=True),
]}

FLOP_FORMULA = (
    "model FLOPs/step (spec): vision 2*N_vision*P + 4*L_v*P*D_v per image token (P = image tokens, 576); "
    "projector 6*N_proj per image token; LLM (4 in stage 1 | 6 in stage 2)*N_llm + (2 | 3)*4*L*seq*D per token "
    "(batch x seq tokens, N_llm with embeddings and LM head, no causal discount, remat recompute not counted)")


def step_flops(case: Case, n_vision: int, n_projector: int, n_llm: int) -> float:
  """Model FLOPs of one training step by the spec's count (parameter counts from the model that ran)."""
  p, images, tokens = case.image_tokens, case.batch, case.batch * case.seq
  vision = images * p * (2 * n_vision + 4 * case.vision["num_hidden_layers"] * p * case.vision["hidden_size"])
  projector = 6 * n_projector * images * p
  attention = 4 * case.text["num_hidden_layers"] * case.seq * case.text["hidden_size"]
  llm = tokens * ((4 * n_llm + 2 * attention) if case.stage == 1 else (6 * n_llm + 3 * attention))
  return float(vision + projector + llm)


def make_rows(case: Case, seed: int = 0) -> dict[str, np.ndarray]:
  """Token ids and labels of one batch, in the expanded layout (image positions first).

  Returns int32 `text_ids` [B, seq - P] and `text_labels` [B, seq - P] (IGNORE_INDEX on the first half), and
  float32 `images` [B, S, S, 3] in [-1, 1]; both sides build their inputs from these.
  """
  rng = np.random.default_rng(seed)
  n_text = case.seq - case.image_tokens
  if n_text < 2:
    raise ValueError(f"{case.name}: seq {case.seq} leaves no text after {case.image_tokens} image positions")
  # Ids below vocab - 1: the peer uses the last id as its image token.
  text_ids = rng.integers(3, case.text["vocab_size"] - 1, size=(case.batch, n_text), dtype=np.int32)
  text_labels = text_ids.copy()
  text_labels[:, :n_text // 2] = IGNORE_INDEX
  size = case.vision["image_size"]
  images = rng.uniform(-1, 1, size=(case.batch, size, size, 3)).astype(np.float32)
  return {"text_ids": text_ids, "text_labels": text_labels, "images": images}


def ours_batch(case: Case, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The trainer's batch [accum=1, B, ...]: one placeholder, the text, then padding up to `seq` input ids."""
  b, n_text = rows["text_ids"].shape
  ids = np.zeros((b, case.seq), np.int32)
  labels = np.full((b, case.seq), IGNORE_INDEX, np.int32)
  mask = np.zeros((b, case.seq), np.int32)
  ids[:, 0] = IMAGE_TOKEN_INDEX
  ids[:, 1:1 + n_text] = rows["text_ids"]
  labels[:, 1:1 + n_text] = rows["text_labels"]
  mask[:, :1 + n_text] = 1
  batch = {"input_ids": ids, "labels": labels, "attention_mask": mask, "images": rows["images"]}
  return {k: v[None] for k, v in batch.items()}


def peer_ids_labels(case: Case, rows: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """llava-hf's layout, int64[B, seq] each: one image token (the last vocabulary id) per image position."""
  b, p = rows["text_ids"].shape[0], case.image_tokens
  ids = np.concatenate([np.full((b, p), case.text["vocab_size"] - 1, np.int64), rows["text_ids"]], axis=1)
  labels = np.concatenate([np.full((b, p), IGNORE_INDEX, np.int64), rows["text_labels"]], axis=1)
  return ids, labels


def supervised_tokens(rows: dict[str, np.ndarray]) -> int:
  """Targets of next-token prediction: supervised labels after the first position."""
  return int((rows["text_labels"] != IGNORE_INDEX).sum())


# --- llava_jax worker --------------------------------------------------------------------------------------------


def matmul_tflops(n: int, iters: int, repeats: int = 3) -> float:
  """bf16 n^3 matmul TFLOP/s in JAX (best of `repeats` runs of `iters` back-to-back calls)."""
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.bfloat16)
  b = jax.random.normal(kb, (n, n), jnp.bfloat16)
  f = jax.jit(jnp.matmul)
  f(a, b).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(iters):
      c = f(a, b)
    c.block_until_ready()
    best = min(best, (time.perf_counter() - start) / iters)
  return 2 * n ** 3 / best / 1e12


class _Config(dict):
  """Attribute access over a dict: what `optim.make_optimizer` reads from a ConfigDict."""

  def __getattr__(self, name):
    try:
      return self[name]
    except KeyError as e:
      raise AttributeError(name) from e


def model_config(case: Case, remat_policy: str = "full", attention_impl: str = "", overrides: dict | None = None):
  """(ModelConfig, RuntimeConfig) of a case: bf16 parameters and compute, scanned layers, remat in remat cases,
  the RuntimeConfig defaults otherwise; `overrides` (a --variant's settings) change them."""
  overrides = overrides or {}
  cfg = ModelConfig(vision=VisionConfig(**case.vision), text=TextConfig(**case.text), projector_type="mlp2x_gelu")
  runtime = RuntimeConfig(param_dtype="bfloat16", dtype="bfloat16", attention_impl=attention_impl or None,
                          remat_policy=overrides.get("remat_policy", remat_policy if case.remat else "none"),
                          scan_layers=overrides.get("scan_layers", True),
                          recompute_elementwise=overrides.get("recompute_elementwise",
                                                              RuntimeConfig.recompute_elementwise))
  return cfg, runtime


def param_counts(model) -> tuple[int, int, int]:
  """(vision tower, projector, language model incl. embeddings and LM head) parameter counts of a LlavaModel."""
  params = nnx.state(model, nnx.Param)
  count = lambda part: sum(math.prod(x.shape) for x in jax.tree.leaves(params[part]))
  return count("vision_tower"), count("projector"), count("language_model")


def run_ours(case: Case, small: bool, steps: int, warmup: int, loss_chunk: int, remat_policy: str,
             attention_impl: str = "", profile_dir: str | None = None, profile_steps: int = 2,
             overrides: dict | None = None) -> dict:
  overrides = overrides or {}
  loss_chunk = overrides.get("loss_chunk", loss_chunk)

  compiles = []  # fun_name of every XLA compilation in this process
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, _, **kw: compiles.append(kw.get("fun_name")) if event.endswith("backend_compile_duration")
      else None)
  n = 512 if small else 8192
  peak = matmul_tflops(n, 3 if small else 20)

  cfg, runtime = model_config(case, remat_policy, attention_impl, overrides)
  parts = optim.STAGE_TRAINABLE[case.stage]
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  abstract = nnx.eval_shape(lambda: LlavaModel(cfg, runtime, rngs=nnx.Rngs(0)))
  graphdef, trainable_abs, frozen_abs = nnx.split(abstract, optim.trainable_filter(parts), ...)
  n_vision, n_projector, n_llm = param_counts(abstract)

  # Random weights made on the device, laid out on the mesh as the trainer does (7B never exists on the host).
  shardings = (sharding.state_shardings(trainable_abs, mesh), sharding.state_shardings(frozen_abs, mesh))

  @functools.partial(jax.jit, out_shardings=shardings)
  def init():
    _, trainable, frozen = nnx.split(LlavaModel(cfg, runtime, rngs=nnx.Rngs(0)), optim.trainable_filter(parts),
                                     ...)
    return trainable, frozen

  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    trainable, frozen = jax.block_until_ready(init())
  init_s = time.perf_counter() - t0
  optim_cfg = _Config(learning_rate=2e-5, warmup_ratio=0.03, warmup_steps=-1, schedule="cosine", weight_decay=0.0,
                      b1=0.9, b2=0.999, eps=1e-8, max_grad_norm=1.0, state_dtype="bfloat16")
  tx, schedule = optim.make_optimizer(optim_cfg, total_steps=1000)
  # As the trainer: the state is donated, the frozen parameters are an argument that is not differentiated.
  state = TrainState(jnp.zeros((), jnp.int32), trainable, jax.jit(tx.init)(trainable))
  # Scalars made off the mesh (step, optimizer counts) would differ in type from the step's outputs and cost a
  # second compilation at the second step: put them on the mesh too.
  state = jax.tree.map(lambda x: x if isinstance(x.sharding, NamedSharding) else
                       jax.device_put(x, NamedSharding(mesh, P())), state)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  train_step = jax.jit(make_train_step(graphdef, tx, schedule, loss_chunk=loss_chunk),
                       in_shardings=(state_shardings, None, None), out_shardings=(state_shardings, None),
                       donate_argnums=(0,))
  rows = make_rows(case)
  batch = jax.device_put(ours_batch(case, rows), NamedSharding(mesh, P()))  # on the device before the loop

  with jax.set_mesh(mesh):
    t0 = time.perf_counter()
    lowered = train_step.lower(state, frozen, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    for _ in range(warmup):
      state, metrics = train_step(state, frozen, batch)
    jax.block_until_ready((state, metrics))
    before = len(compiles)
    t3 = time.perf_counter()
    for _ in range(steps):
      state, metrics = train_step(state, frozen, batch)
    jax.block_until_ready((state, metrics))  # the only synchronisation of the timed loop
    step_s = (time.perf_counter() - t3) / steps
    profile = None
    if profile_dir:  # after the timing, so the trace costs the timed steps nothing
      profile = _profile(lambda s: train_step(s, frozen, batch), state, profile_dir, profile_steps)
      state = profile.pop("state")
  metrics = jax.device_get(metrics)
  stats = jax.devices()[0].memory_stats() or {}
  memory = compiled.memory_analysis()
  try:
    cache_size = train_step._cache_size()  # pylint: disable=protected-access
  except AttributeError:
    cache_size = None
  return dict(
      step_s=step_s, lower_s=t1 - t0, compile_s=t2 - t0, init_s=init_s, loss=float(metrics["loss"]),
      finite=bool(metrics["finite"]), supervised_tokens=int(metrics["supervised_tokens"]),
      expected_supervised_tokens=supervised_tokens(rows),
      step_compiles=sum(name == "jit(train_step)" for name in compiles),
      compiles_in_timed_loop=len(compiles) - before,
      jit_cache_size=cache_size, peak_bytes=stats.get("peak_bytes_in_use"),
      xla_temp_bytes=getattr(memory, "temp_size_in_bytes", None), matmul_tflops=peak, matmul_n=n,
      flops=step_flops(case, n_vision, n_projector, n_llm), n_vision=n_vision, n_projector=n_projector,
      n_llm=n_llm, remat_policy=runtime.remat_policy, attention_impl=layers.attention_implementation(runtime),
      loss_chunk=loss_chunk, scan_layers=runtime.scan_layers, recompute_elementwise=runtime.recompute_elementwise,
      xla_flags=overrides.get("xla_flags", ""), device=jax.devices()[0].device_kind,
      versions=f"jax {jax.__version__}", profile=profile)


def _profile(step, state, trace_dir: str, n: int) -> dict:
  """Traces n steps; -> {state, top: busiest device ops (trace_summary rows) or error}. Never raises."""
  import trace_summary  # pylint: disable=g-import-not-at-top  (benchmarks/ is on sys.path as the script's folder)
  try:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(n):
        state, metrics = step(state)
      jax.block_until_ready((state, metrics))
    return {"state": state, "dir": trace_dir, "top": trace_summary.summarize(trace_dir, top=25, steps=n)}
  except Exception as e:  # pylint: disable=broad-except  (a failed trace must not lose the measured row)
    traceback.print_exc()
    return {"state": state, "dir": trace_dir, "error": f"{type(e).__name__}: {e}"[:300]}


# --- PyTorch peer worker -----------------------------------------------------------------------------------------


def run_peer(case: Case, steps: int, warmup: int) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  vocab = case.text["vocab_size"]
  vision = transformers.CLIPVisionConfig(**case.vision, hidden_act="quick_gelu", layer_norm_eps=1e-5)
  text = transformers.LlamaConfig(**case.text, rms_norm_eps=1e-5, max_position_embeddings=4096,
                                  tie_word_embeddings=False, use_cache=False)
  config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab - 1,
                                    image_seq_length=case.image_tokens, projector_hidden_act="gelu",
                                    vision_feature_select_strategy="default", vision_feature_layer=-2)
  t0 = time.perf_counter()
  with device:  # random weights made on the device
    model = transformers.LlavaForConditionalGeneration._from_config(  # pylint: disable=protected-access
        config, dtype=torch.bfloat16, attn_implementation="sdpa")
  init_s = time.perf_counter() - t0
  inner = model.model
  model.requires_grad_(False)
  trained = [inner.multi_modal_projector] + ([inner.language_model, model.lm_head] if case.stage == 2 else [])
  for module in trained:
    module.requires_grad_(True)
  if case.remat:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.2x
      model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
      model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(params, lr=2e-5, weight_decay=0.0, fused=True)  # bf16 params -> bf16 states

  rows = make_rows(case)
  ids, labels = peer_ids_labels(case, rows)
  inputs = dict(input_ids=torch.from_numpy(ids).to(device), labels=torch.from_numpy(labels).to(device),
                attention_mask=torch.ones(ids.shape, dtype=torch.long, device=device),
                pixel_values=torch.from_numpy(rows["images"]).permute(0, 3, 1, 2).to(device, torch.bfloat16))

  def step():
    loss = model(**inputs, use_cache=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()

  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  for _ in range(warmup):
    loss = step()
  sync()
  t0 = time.perf_counter()
  for _ in range(steps):
    loss = step()
  sync()
  step_s = (time.perf_counter() - t0) / steps
  count = lambda m: sum(x.numel() for x in m.parameters())
  return dict(
      step_s=step_s, init_s=init_s, loss=float(loss), finite=bool(torch.isfinite(loss)),
      supervised_tokens=int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum()),
      expected_supervised_tokens=supervised_tokens(rows),
      peak_bytes=torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
      flops=step_flops(case, count(inner.vision_tower), count(inner.multi_modal_projector),
                       count(inner.language_model) + count(model.lm_head)),
      gradient_checkpointing=case.remat, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
      versions=f"torch {torch.__version__}, transformers {transformers.__version__}")


def worker_main() -> None:
  case = (SMALL_CASES if _SMALL.value else CASES)[_CASES.value[0]]
  steps, warmup = _steps()
  try:
    if _WORKER.value == "ours":
      profile_dir = os.path.join(_PROFILE.value, _CASES.value[0]) if _PROFILE.value else None
      result = run_ours(case, _SMALL.value, steps, warmup, _LOSS_CHUNK.value, _REMAT_POLICY.value,
                        _ATTENTION.value, profile_dir, _PROFILE_STEPS.value, json.loads(_OVERRIDES.value))
    else:
      result = run_peer(case, steps, warmup)
    result["status"] = "ok"
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc()
    text = f"{type(e).__name__}: {e}"
    oom = any(s in text for s in ("RESOURCE_EXHAUSTED", "out of memory", "OutOfMemory"))
    result = {"status": "OOM" if oom else "error", "error": text[:500]}
  pathlib.Path(_RESULT.value).write_text(json.dumps(result))


# --- driver ------------------------------------------------------------------------------------------------------


def _steps() -> tuple[int, int]:
  steps = _STEPS.value if _STEPS.value is not None else (2 if _SMALL.value else 5)
  warmup = _WARMUP.value if _WARMUP.value is not None else (1 if _SMALL.value else 2)
  return steps, warmup


def run_case(side: str, name: str, timeout: float, overrides: dict | None = None) -> dict:
  """Runs one case in a fresh process (llava_jax with a --variant's `overrides`: no profile); never raises
  (failures become the row's status)."""
  overrides = overrides or {}
  with tempfile.TemporaryDirectory() as tmp:
    result_file = os.path.join(tmp, "result.json")
    passed = [f"--{f}={getattr(flags.FLAGS, f)}" for f in ("steps", "warmup")
              if getattr(flags.FLAGS, f) is not None]
    cmd = [sys.executable, __file__, f"--worker={side}", f"--cases={name}", f"--result_file={result_file}",
           f"--loss_chunk={_LOSS_CHUNK.value}", f"--remat_policy={_REMAT_POLICY.value}",
           f"--attention_impl={_ATTENTION.value}", f"--profile_steps={_PROFILE_STEPS.value}",
           f"--overrides={json.dumps(overrides)}",
           *([f"--profile_dir={_PROFILE.value}"] if _PROFILE.value and side == "ours" and not overrides else []),
           "--small" if _SMALL.value else "--nosmall", *passed]
    print(f"\n=== {name} ({side}{' ' + json.dumps(overrides) if overrides else ''}) ===", file=sys.stderr,
          flush=True)
    start = time.perf_counter()
    env = dict(os.environ)
    if overrides.get("xla_flags"):
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + overrides["xla_flags"]).strip()
    if _SMALL.value:  # tiny shapes on CPU: compile time dominates, and XLA's optimisations do not pay back
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                          " --xla_llvm_disable_expensive_passes=true").strip()
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=sys.stderr, env=env)
    try:
      rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
      return {"status": f"timeout ({timeout:.0f} s)", "wall_s": time.perf_counter() - start}
    wall = time.perf_counter() - start
    if os.path.exists(result_file):
      return json.loads(pathlib.Path(result_file).read_text()) | {"wall_s": wall}
    return {"status": f"crashed (rc {rc})", "wall_s": wall}


def _fmt(x, spec: str = "") -> str:
  if x is None:
    return "-"
  return format(x, spec or (".1f" if abs(x) >= 10 else ".3g"))


def render(results: list[dict], peak: float | None, small: bool) -> str:
  """Markdown table (readable as plain text) and the notes that define its columns."""
  head = ["case", "impl", "batch x seq", "step s", "tokens/s", "model TFLOP/s", "% of matmul peak", "peak GB",
          "compile s", "step compiles", "loss", "ours / peer tokens/s"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  by_key = {(r["case"], r["impl"]): r for r in results}
  for r in results:
    case = (SMALL_CASES if small else CASES)[r["case"]]
    cells = [r["case"], r["impl"], f"{case.batch} x {case.seq}"]
    if r.get("status") != "ok":
      cells += [r.get("status", "?")] + ["-"] * (len(head) - 4)
    else:
      tflops = r["flops"] / r["step_s"] / 1e12
      ratio = None
      peer = by_key.get((r["case"], "peer"))
      if r["impl"].startswith("llava_jax") and peer and peer.get("status") == "ok":
        ratio = peer["step_s"] / r["step_s"]
      compiles = None if r["impl"] == "peer" else f"{r['step_compiles']} (+{r['compiles_in_timed_loop']} timed)"
      cells += [f"{r['step_s']:.4f}", f"{r['tokens_per_s']:,.0f}", _fmt(tflops), _fmt(peak and 100 * tflops / peak),
                _fmt(r.get("peak_bytes") and r["peak_bytes"] / 1e9, ".1f"),
                _fmt(r.get("compile_s"), ".1f"), compiles or "-", f"{r['loss']:.3f}" + ("" if r["finite"] else " !"),
                _fmt(ratio, ".2f") + ("x" if ratio else "")]
    lines.append("| " + " | ".join(cells) + " |")
  ok = [r for r in results if r.get("status") == "ok"]
  devices = sorted({f"{r['impl']}: {r['device']} ({r['versions']})" for r in ok})
  ours = [r for r in ok if r["impl"].startswith("llava_jax")]
  policy = sorted({f"attention {r['attention_impl']}, loss chunk {r['loss_chunk']}"
                   for r in ours if r["impl"] == "llava_jax"})
  remat = sorted({r["remat_policy"] for r in ours if r["case"].endswith("remat") and r["impl"] == "llava_jax"})
  variants = sorted({f"{r['impl']}: scan_layers {r['scan_layers']}, recompute_elementwise "
                     f"{r['recompute_elementwise']}, loss chunk {r['loss_chunk']}, remat {r['remat_policy']}"
                     + (f", XLA_FLAGS+={r['xla_flags']}" if r.get("xla_flags") else "")
                     for r in ours if r["impl"] != "llava_jax"})
  notes = [
      f"devices: {'; '.join(devices) or '-'}",
      "both: random weights, bf16 parameters and compute, AdamW (bf16 moments) after clipping to global norm 1, "
      "one device; llava_jax: the trainer's train step (llava_jax.train.step), scanned layers, norms and SwiGLU "
      "recomputed in the backward pass (recompute_elementwise), "
      f"{'; '.join(policy) or '-'}, remat policy '{'/'.join(remat) or '-'}' in the remat case; peer: transformers "
      "LlavaForConditionalGeneration, SDPA, torch.optim.AdamW(fused=True), gradient checkpointing in the remat "
      "case; ours / peer = peer step s / our step s (same batch, same FLOPs)",
      *([f"variant rows (llava_jax[NAME], settings changed from the llava_jax row's): {'; '.join(variants)}"]
        if variants else []),
      f"matmul peak: {_fmt(peak)} TFLOP/s (JAX bf16 {ours[0]['matmul_n'] if ours else '-'}^3, best over the "
      "llava_jax workers of this run)",
      FLOP_FORMULA,
      "step s: mean of the timed steps after compile + warmup; tokens/s = batch x seq / step s; peak GB: device "
      "peak_bytes_in_use (JAX) / max_memory_allocated (PyTorch), per case (one process each); compile s: lower + "
      "compile of the train step; step compiles: XLA compilations of the train step in the process (+ any "
      "compilation during the timed steps); '!' = non-finite loss (update skipped).",
  ]
  text = "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"
  for r in ok:
    profile = r.get("profile")
    if profile:
      import trace_summary  # pylint: disable=g-import-not-at-top  (next to this script, on sys.path when run)
      title = f"\n### {r['case']} ({r['impl']}): busiest device ops, trace in {profile['dir']}"
      text += (trace_summary.render(profile["top"], title) if "top" in profile else
               f"{title}\n{profile.get('error')}\n")
  return text


def main(argv):
  del argv
  if _WORKER.value:
    worker_main()
    return
  table = SMALL_CASES if _SMALL.value else CASES
  names = _CASES.value or list(table)
  unknown = [n for n in names if n not in table]
  if unknown:
    raise app.UsageError(f"unknown cases {unknown}; known: {', '.join(table)}")
  try:
    variants = [parse_variant(v) for v in _VARIANTS.value]
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  start = time.perf_counter()
  results = []
  for name in names:
    rows = [("ours", "llava_jax", None)] + ([("peer", "peer", None)] if _PEER.value else [])
    rows += [("ours", f"llava_jax[{v}]", settings) for v, settings in variants]
    for side, impl, overrides in rows:
      timeout = _TIMEOUT.value
      if _DEADLINE.value is not None:
        timeout = min(timeout, _DEADLINE.value - (time.perf_counter() - start))
      if timeout < (_MIN_CASE.value if _DEADLINE.value is not None else 1):
        result = {"status": "skipped (deadline)"}
      else:
        result = run_case(side, name, timeout, overrides)
      result.update(case=name, impl=impl)
      if result.get("status") == "ok":
        result["tokens_per_s"] = table[name].batch * table[name].seq / result["step_s"]
      results.append(result)
      peaks = [r["matmul_tflops"] for r in results if r.get("matmul_tflops")]
      text = render(results, max(peaks) if peaks else None, _SMALL.value)
      if _OUT.value:  # rewritten after every case: a killed run keeps what it measured
        out = pathlib.Path(_OUT.value)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps(
            {"small": _SMALL.value, "steps": _steps()[0], "warmup": _steps()[1], "flop_formula": FLOP_FORMULA,
             "matmul_peak_tflops": max(peaks) if peaks else None, "results": results}, indent=1))
  print("\n" + text, flush=True)


if __name__ == "__main__":
  app.run(main)
