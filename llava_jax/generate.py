r"""Generation with a KV cache: a jit-compiled prefill and an on-device decode loop; the `generate` CLI.

`Engine` works on token ids with LLaVA's one `IMAGE_TOKEN_INDEX` per image and preprocessed images.
`Generator` adds the model folder's conversation template, tokenizer and image preprocessing (the same prompt
builder as training: `llava_jax.data.tokenize.encode_prompt`).

How a batch runs:
- the engine runs the LLM layers unstacked (`unstack_layers`), each with its own weights and its own (k, v)
  cache arrays (head-major, [B, K, S, H]), so a decode step reads the weights in place and writes one cache
  slot per layer;
- prefill: the prompts (right-padded ids with placeholders) are spliced LEFT-padded to L positions, so every
  row's last prompt token sits at slot L - 1; the decoder fills slots [0, L) of a cache of S = L + N slots and the
  first new token is sampled from the last position.
- decode: a `jax.lax.while_loop` feeds one token per step at slot L + i, RoPE position (prompt length + i), and
  samples the next; its attention is XLA's (masked) or, with `decode_attention='pallas'`, JAX's flash-decoding
  kernel over each row's slots [first real prompt slot, L + i]. It stops after a given number of steps or when
  every row has produced the EOS token. The host calls it once (no stop strings), once per token (streaming),
  or in chunks, checking stop strings on the decoded text between chunks.
- static shapes: the batch size, the number of images, the prompt lengths (before and after image expansion) and
  the number of new tokens N are rounded up to buckets, so one program is compiled per bucket.

Sampling: greedy (temperature 0), or temperature with nucleus (top-p) filtering, from a seeded key.

  python -m llava_jax.generate --model DIR --image IMG --prompt "What is in the image?" [--max-new-tokens 128]
      [--temperature 0] [--top-p 1] [--seed 0]
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from llava_jax import model_folder
from llava_jax import sharding
from llava_jax.data import images as images_lib
from llava_jax.data import templates
from llava_jax.data import tokenize
from llava_jax.models import cache_attention
from llava_jax.models import llama
from llava_jax.models.config import IMAGE_TOKEN_INDEX, RuntimeConfig
from llava_jax.models.llava import LlavaModel


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How tokens are chosen and when generation ends.

  Attributes:
    max_new_tokens: at most this many tokens per row (the EOS token included).
    temperature: 0 = greedy (argmax); otherwise logits / temperature are sampled.
    top_p: nucleus sampling: keep the smallest set of most likely tokens whose probability reaches top_p.
    seed: seed of the sampling key (the same seed, inputs and batch give the same tokens).
    stop_strings: generation of a row ends once its decoded text contains one of these; the text is cut before it.
    stop_token_ids: generation of a row also ends on these ids, on the device (as on EOS; the finish reason is
      'stop'). `Generator.params` puts stop strings that are one special token here, since the text that
      stop strings are matched against is decoded without special tokens.
    ignore_eos: keep generating after the EOS token (and the stop token ids) (benchmarks).
    chunk_size: decode steps per device call when stop strings are checked on the host.
  """
  max_new_tokens: int = 128
  temperature: float = 0.0
  top_p: float = 1.0
  seed: int = 0
  stop_strings: tuple[str, ...] = ()
  stop_token_ids: tuple[int, ...] = ()
  ignore_eos: bool = False
  chunk_size: int = 16

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.chunk_size < 1:
      raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
    object.__setattr__(self, "stop_strings", tuple(s for s in self.stop_strings if s))
    object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in self.stop_token_ids))

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


class Request(NamedTuple):
  """One prompt.

  input_ids: int32[T] token ids (BOS included) with one IMAGE_TOKEN_INDEX per image.
  images: float32[n, S, S, 3] preprocessed images, n = number of placeholders (None or n = 0 for text only).
  """
  input_ids: np.ndarray
  images: np.ndarray | None = None


class Output(NamedTuple):
  """What a row generated (the prompt excluded).

  token_ids: the generated ids, without the EOS token; with a stop string, up to the token that completed it.
  text: their decoded text (special tokens skipped), cut before the first stop string.
  finish_reason: 'eos', 'stop' (a stop string or stop token) or 'length' (max_new_tokens reached).
  """
  token_ids: list[int]
  text: str
  finish_reason: str


def bucket(n: int, minimum: int = 16, steps_per_octave: int = 8) -> int:
  """`n` rounded up to a multiple of `minimum`, and above 2 * minimum * steps_per_octave to one of
  `steps_per_octave` evenly spaced sizes per power of two (at most 1 / steps_per_octave padding):
  16, 32, ..., 256, 288, 320, ..., 512, 576, ..."""
  octave = 1 << max(n - 1, 1).bit_length()  # smallest power of two >= n
  step = max(octave // (2 * steps_per_octave), minimum)
  return max(-(-n // step) * step, minimum)


def batch_bucket(n: int) -> int:
  """Rows and images: powers of two."""
  return 1 if n <= 1 else 1 << (n - 1).bit_length()


# Per-layer keys and values, dtype[B, K, S, H] each (head-major): one (k, v) pair per decoder layer.
LayerCaches = tuple[tuple[jax.Array, jax.Array], ...]


class DecodeState(NamedTuple):
  """Everything the decode loop carries; [B] = batch rows, S cache slots, N new-token buffer."""
  cache: LayerCaches
  kv_mask: jax.Array  # bool[B, S] slots holding real tokens (prompt padding False)
  token: jax.Array  # int32[B] the last sampled token, not yet fed to the model
  position: jax.Array  # int32[B] its RoPE position
  slot: jax.Array  # int32[] its cache slot
  tokens: jax.Array  # int32[B, N] generated tokens (pad after EOS)
  step: jax.Array  # int32[] number of tokens generated
  done: jax.Array  # bool[B] the row has produced EOS
  rng: jax.Array  # key


def unstack_layers(model: LlavaModel, fuse: bool = True) -> LlavaModel:
  """A copy of `model` for generation whose LLM decoder layers are L separate modules (`nnx.List`), each with
  arrays of its own, instead of one stack of [L, ...] arrays run under `lax.scan`; with `fuse`, each layer's
  q/k/v and gate/up kernels are also concatenated (one matmul each; skipped where a kernel's output axis is
  sharded, since splitting the fused output would then move data between devices).

  Why: in a decode step every layer's weights and KV cache must be read once and the cache written one slot.
  Under a scan, each step slices the stacked weights (a copy per layer unless XLA fuses the slice into the
  matmul) and the scan reads the stacked cache as input and writes a fresh stacked output (a zero-fill and a
  copy of the whole cache per step). With separate arrays XLA reads the weights in place and updates each
  layer's cache in place in the loop carry. The other parameters are shared with `model`; the layers' arrays
  are copies (the stacked ones are freed when `model` is). Fusing: a decode step at small batch reads weights;
  fewer, larger matmuls read them closer to the memory bandwidth (fewer kernels, less launch and tail time).
  """
  copy = nnx.merge(*nnx.split(model))
  if isinstance(copy.language_model.layers, nnx.List):  # already unstacked
    return copy
  stack_graph, stack_state = nnx.split(copy.language_model.layers)
  copy.language_model.layers = nnx.List([
      nnx.merge(stack_graph, jax.tree.map(lambda a, i=i: a[i], stack_state))
      for i in range(model.cfg.text.num_hidden_layers)])
  if fuse:
    for layer in copy.language_model.layers:
      attn, mlp = layer.self_attn, layer.mlp
      if all(map(llama.output_axis_whole, (attn.q_proj, attn.k_proj, attn.v_proj))):
        attn.fuse_projections()
      if all(map(llama.output_axis_whole, (mlp.gate_proj, mlp.up_proj))):
        mlp.fuse_projections()
  return copy


def run_layers(lm, x: jax.Array, positions: jax.Array, kv_mask: jax.Array, caches: LayerCaches,
               index: jax.Array | int, decode_attention: str = "xla", k_splits: int | None = None
               ) -> tuple[jax.Array, LayerCaches]:
  """The decoder of an `unstack_layers` model over T new tokens with a KV cache of S slots, as
  `LlamaModel.decode(x, positions, kv_mask=..., cache=..., cache_index=index)` computes it.

  Args:
    lm: the LlamaModel, its `layers` an nnx.List.
    x: [B, T, D] embeddings; positions: int32[B, T] RoPE positions.
    kv_mask: bool[B, S] slots holding real tokens; the new tokens go to slots [index, index + T) and attend to
      the slots <= their own.
    caches: one (k, v) pair of [B, K, S, H] per layer.
    decode_attention: 'xla' (masked), or 'pallas' for the flash-decoding kernel when T = 1; that needs each
      row's real slots to be one run, False before it and True from it on (left padding, as the engine's).
    k_splits: at most this many parts of the cache per (row, kv head) in the kernel (None: the default).
  Returns:
    ([B, T, D] normed hidden states, the updated caches).
  """
  cos, sin = llama.rope_tables(lm.cfg, positions)
  _check_decode_attention(decode_attention)
  mask, window = None, None
  if decode_attention == "pallas" and x.shape[1] == 1:
    window = cache_attention.window_of(kv_mask, index, k_splits)
  else:
    mask = llama.slot_mask(x.shape[1], kv_mask.shape[1], index, kv_mask)  # [B, 1, T, S]
  new_caches = []
  for layer, kv in zip(lm.layers, caches):
    x, kv = layer(sharding.constrain_batch(x), cos, sin, mask, kv, index, window)
    new_caches.append(kv)
  return lm.norm(x), tuple(new_caches)


def _check_decode_attention(name: str) -> None:
  if name not in ("xla", "pallas"):
    raise ValueError(f"decode_attention must be 'xla' or 'pallas', got {name!r}")


def filter_logits(logits: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
  """float[B, V] -> float32[B, V]: logits / temperature, with -inf outside the nucleus (the most likely tokens
  until the probability before them reaches `top_p`; the top token always stays; all stay at top_p = 1)."""
  logits = logits.astype(jnp.float32) / temperature
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where((logits >= cutoff) | (top_p >= 1.0), logits, -jnp.inf)


def sample_logits(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array, *,
                  greedy: bool) -> jax.Array:
  """float[B, V] -> int32[B]: argmax if `greedy`, else a sample of softmax(`filter_logits`)."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, filter_logits(logits, temperature, top_p), axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_len", "cache_len", "max_new", "greedy",
                                             "cache_dtype"))
def _prefill(state, input_ids, attention_mask, images, rng, temperature, top_p, end_ids, pad_id, *, graphdef,
             prompt_len, cache_len, max_new, greedy, cache_dtype) -> DecodeState:
  """ids int32[B, T], mask bool[B, T], images float[I, S, S, 3] or None -> DecodeState with 1 token generated;
  end_ids int32[E]: the ids that end a row.

  Module-level (the model's graph static, its state an argument) so that engines of equal models share programs.
  """
  model = nnx.merge(graphdef, state)
  lm = model.language_model
  spliced = model.embed_inputs(input_ids, attention_mask, images, out_len=prompt_len, pad_left=True)
  b = input_ids.shape[0]
  kv_mask = jnp.concatenate([spliced.mask, jnp.ones((b, cache_len - prompt_len), bool)], axis=1)
  shape = (b, lm.cfg.num_key_value_heads, cache_len, lm.cfg.head_size)
  caches = tuple((jnp.zeros(shape, cache_dtype), jnp.zeros(shape, cache_dtype)) for _ in lm.layers)
  hidden, caches = run_layers(lm, spliced.embeds, spliced.positions, kv_mask, caches, 0)
  logits = lm.logits(hidden[:, -1:])[:, 0]
  rng, key = jax.random.split(rng)
  token = sample_logits(logits, key, temperature, top_p, greedy=greedy)
  tokens = jnp.full((b, max_new), pad_id, jnp.int32).at[:, 0].set(token)
  return DecodeState(cache=caches, kv_mask=kv_mask, token=token, position=spliced.positions[:, -1] + 1,
                     slot=jnp.asarray(prompt_len, jnp.int32), tokens=tokens, step=jnp.asarray(1, jnp.int32),
                     done=_is_end(token, end_ids), rng=rng)


@functools.partial(jax.jit, static_argnames=("graphdef", "greedy", "ignore_eos", "decode_attention", "k_splits"),
                   donate_argnums=(1,))
def _decode(state, ds: DecodeState, stop_step, temperature, top_p, end_ids, pad_id, *, graphdef, greedy,
            ignore_eos, decode_attention, k_splits) -> DecodeState:
  """Decodes until `ds.step == stop_step` (<= N) or every row is done."""
  lm = nnx.merge(graphdef, state).language_model

  def cond(ds):
    running = ds.step < stop_step
    return running if ignore_eos else running & ~jnp.all(ds.done)

  def body(ds):
    hidden, cache = run_layers(lm, lm.embed(ds.token[:, None]), ds.position[:, None], ds.kv_mask, ds.cache,
                               ds.slot, decode_attention, k_splits)
    logits = lm.logits(hidden)[:, 0]
    token = sample_logits(logits, jax.random.fold_in(ds.rng, ds.step), temperature, top_p, greedy=greedy)
    token = jnp.where(ds.done, pad_id, token)
    tokens = jax.lax.dynamic_update_slice_in_dim(ds.tokens, token[:, None], ds.step, axis=1)
    done = ds.done if ignore_eos else ds.done | _is_end(token, end_ids)
    return ds._replace(cache=cache, token=token, position=ds.position + 1, slot=ds.slot + 1, tokens=tokens,
                       step=ds.step + 1, done=done)

  return jax.lax.while_loop(cond, body, ds)


def _is_end(token: jax.Array, end_ids: jax.Array) -> jax.Array:
  """int32[B], int32[E] -> bool[B]: the token is one of end_ids."""
  return jnp.any(token[:, None] == end_ids[None, :], axis=-1)


class Engine:
  """Batched generation from token ids and preprocessed images (no tokenizer needed).

  Args:
    model: a LlavaModel (its parameters are captured once; later changes to the module are not seen).
    eos_token_id: generation of a row ends with it, or with any of a list of them (default: the text
      config's `eos_token_ids`).
    pad_token_id: written into rows after they end and into prompt padding (default: the text config's).
    cache_dtype: KV cache dtype (default: the compute dtype).
    fuse_projections: run each layer's q/k/v and gate/up projections as one matmul each (`unstack_layers`).
    decode_attention: 'xla' (masked attention over the whole cache) or 'pallas' (JAX's flash-decoding kernel,
      reading each row's filled slots only; Triton on GPU, interpreted elsewhere; one device only).
    k_splits: at most this many parts of the cache per (row, kv head) in the kernel, a power of two (None:
      `cache_attention.default_splits`).

  The engine runs a copy of the model with unstacked LLM layers (`unstack_layers`): the layers' parameters take
  memory twice while the caller keeps `model` (the CLIs do not).
  """

  def __init__(self, model: LlavaModel, *, eos_token_id: int | Sequence[int] | None = None,
               pad_token_id: int | None = None,
               cache_dtype: Any = None, fuse_projections: bool = True, decode_attention: str = "xla",
               k_splits: int | None = None):
    self.cfg = model.cfg
    self.graphdef, self.state = nnx.split(unstack_layers(model, fuse=fuse_projections))
    self.set_decode_attention(decode_attention, k_splits)
    if eos_token_id is None:
      self.eos_token_ids = self.cfg.text.eos_token_ids
    else:
      self.eos_token_ids = tuple(int(i) for i in np.atleast_1d(eos_token_id))
    self.pad_token_id = self.cfg.text.pad_token_id if pad_token_id is None else pad_token_id
    self.cache_dtype = jnp.dtype(cache_dtype or model.runtime.dtype)

  def set_decode_attention(self, decode_attention: str, k_splits: int | None = None) -> None:
    """Chooses the decode steps' attention for the following calls (the weights stay as they are)."""
    _check_decode_attention(decode_attention)
    if decode_attention == "pallas":
      cache_attention.kernel_interpreted()  # raises where the kernel cannot run
      devices = {d for leaf in jax.tree.leaves(self.state)
                 for d in getattr(getattr(leaf, "sharding", None), "device_set", ())}
      if len(devices) > 1:
        raise ValueError(f"decode_attention='pallas' runs on one device; the model is on {len(devices)} "
                         "(use 'xla', which XLA partitions)")
    if k_splits is not None and (k_splits < 1 or k_splits & (k_splits - 1)):
      raise ValueError(f"k_splits must be a power of two, got {k_splits}")
    self.decode_attention, self.k_splits = decode_attention, k_splits

  # --- host side ----------------------------------------------------------------------------------------------

  def prepare(self, requests: Sequence[Request], max_new_tokens: int, min_rows: int = 1) -> dict[str, Any]:
    """Pads a batch to its buckets: ids int32[B, T] (right-padded), mask bool[B, T], images float32[I, S, S, 3]
    or None, and the static sizes prompt_len (L), cache_len (S) and max_new (N). B >= `min_rows` (a fixed batch
    size keeps a last, smaller batch in the same program)."""
    if not requests:
      raise ValueError("no requests")
    n_image_positions = self.cfg.image_seq_length
    rows, images, expanded = [], [], []
    for i, req in enumerate(requests):
      ids = np.asarray(req.input_ids)
      if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"request {i}: input_ids must be a non-empty 1-D integer array, got {ids.dtype}{ids.shape}")
      n_placeholders = int((ids == IMAGE_TOKEN_INDEX).sum())
      req_images = np.zeros((0,), np.float32) if req.images is None else np.asarray(req.images, np.float32)
      n_images = 0 if req.images is None else req_images.shape[0]
      if n_images != n_placeholders:
        raise ValueError(f"request {i}: {n_placeholders} image placeholders but {n_images} images")
      if n_images:
        s = self.cfg.vision.image_size
        if req_images.shape[1:] != (s, s, self.cfg.vision.num_channels):
          raise ValueError(f"request {i}: images must be [n, {s}, {s}, {self.cfg.vision.num_channels}], "
                           f"got {req_images.shape}")
        images.append(req_images)
      rows.append(ids.astype(np.int32))
      expanded.append(ids.size + n_placeholders * (n_image_positions - 1))
    b = batch_bucket(max(len(rows), min_rows))
    t = bucket(max(r.size for r in rows))
    ids = np.full((b, t), self.pad_token_id, np.int32)
    mask = np.zeros((b, t), bool)
    for i, r in enumerate(rows):
      ids[i, :r.size], mask[i, :r.size] = r, True
    for i in range(len(rows), b):  # filler rows: one real token, never returned
      ids[i, 0], mask[i, 0] = self.pad_token_id, True
    image_batch = None
    if images:
      image_batch = np.concatenate(images)
      n = image_batch.shape[0]
      image_batch = np.concatenate([image_batch, np.zeros((batch_bucket(n) - n, *image_batch.shape[1:]),
                                                          np.float32)])
    prompt_len = bucket(max(expanded))
    max_new = bucket(max_new_tokens)
    limit = self.cfg.text.max_position_embeddings
    if max(expanded) + max_new_tokens > limit:
      logging.warning("prompt (%d positions) + max_new_tokens (%d) exceed max_position_embeddings %d",
                      max(expanded), max_new_tokens, limit)
    return dict(input_ids=ids, attention_mask=mask, images=image_batch, prompt_len=prompt_len,
                cache_len=prompt_len + max_new, max_new=max_new, num_rows=len(rows))

  def start(self, requests: Sequence[Request], params: SamplingParams, min_rows: int = 1
            ) -> tuple[DecodeState, int]:
    """Runs the prefill: -> (state with one token generated, number of real rows)."""
    batch = self.prepare(requests, params.max_new_tokens, min_rows)
    ds = _prefill(self.state, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                  None if batch["images"] is None else jnp.asarray(batch["images"]), jax.random.key(params.seed),
                  jnp.float32(params.temperature or 1.0), jnp.float32(params.top_p), self._end_ids(params),
                  jnp.int32(self.pad_token_id), graphdef=self.graphdef, prompt_len=batch["prompt_len"],
                  cache_len=batch["cache_len"], max_new=batch["max_new"], greedy=params.greedy,
                  cache_dtype=self.cache_dtype)
    return ds, batch["num_rows"]

  def advance(self, ds: DecodeState, params: SamplingParams, stop_step: int) -> DecodeState:
    """Decodes until `stop_step` tokens are generated (or every row is done)."""
    return _decode(self.state, ds, jnp.int32(min(stop_step, params.max_new_tokens)),
                   jnp.float32(params.temperature or 1.0), jnp.float32(params.top_p), self._end_ids(params),
                   jnp.int32(self.pad_token_id), graphdef=self.graphdef, greedy=params.greedy,
                   ignore_eos=params.ignore_eos, decode_attention=self.decode_attention, k_splits=self.k_splits)

  def end_ids(self, params: SamplingParams) -> tuple[int, ...]:
    """The ids that end a row: the EOS ids and the stop token ids (none with `ignore_eos`)."""
    return () if params.ignore_eos else tuple(dict.fromkeys(self.eos_token_ids + params.stop_token_ids))

  def _end_ids(self, params: SamplingParams) -> jax.Array:
    # With ignore_eos there are none: -1, never a token, keeps the shape non-empty and ends no row.
    return jnp.asarray(self.end_ids(params) or (-1,), jnp.int32)

  def generate_ids(self, requests: Sequence[Request], params: SamplingParams = SamplingParams()
                   ) -> list[list[int]]:
    """Generated token ids per request, ending with the EOS (or stop) token where one was produced (no stop
    strings)."""
    ds, n = self.start(requests, params)
    ds = self.advance(ds, params, params.max_new_tokens)
    tokens, step = np.asarray(ds.tokens), int(ds.step)
    ends = self.end_ids(params)
    return [_through_first_end(tokens[i, :step], ends) for i in range(n)]


def _first_end(ids: Sequence[int], ends: Sequence[int]) -> int | None:
  """Index of the first id in `ends`, or None."""
  return next((k for k, x in enumerate(ids) if x in ends), None)


def _through_first_end(ids: np.ndarray, ends: Sequence[int]) -> list[int]:
  ids = [int(x) for x in ids]
  k = _first_end(ids, ends)
  return ids if k is None else ids[:k + 1]


class Generator:
  """Chat-level generation: messages and images in, text out, with the model folder's template and image
  preprocessing.

  Args:
    model: a LlavaModel; its config names the template, image size, aspect mode, mean and std.
    tokenizer: the model's transformers tokenizer.
    template: overrides the config's template name.
  """

  def __init__(self, model: LlavaModel, tokenizer: Any, *, template: str | None = None, **engine_kw):
    self.cfg = model.cfg
    self.tokenizer = tokenizer
    self.template = templates.get_template(template or self.cfg.template)
    self.engine = Engine(model, **engine_kw)

  @classmethod
  def from_folder(cls, path: str, runtime: Any = None, mesh: Any = None, **kw) -> "Generator":
    """From a model folder (`llava_jax.model_folder` layout)."""
    model = model_folder.load_model(path, runtime or RuntimeConfig(), mesh=mesh)
    return cls(model, model_folder.load_tokenizer(path), **kw)

  @property
  def stop_strings(self) -> tuple[str, ...]:
    """The template's end-of-turn string, unless it is an EOS token's text (Vicuna's '</s>'), which ends
    generation on the device without the host checking text between chunks."""
    end = self.template.end_of_turn
    eos_texts = self.tokenizer.convert_ids_to_tokens(list(self.engine.eos_token_ids))
    return () if end in eos_texts else (end,)

  def special_token_id(self, text: str) -> int | None:
    """The id of `text` if it is one special (or added) token of the tokenizer, e.g. '<|im_end|>'; else None."""
    added = self.tokenizer.get_added_vocab()
    if text in added:
      return int(added[text])
    if text in self.tokenizer.all_special_tokens:
      return int(self.tokenizer.convert_tokens_to_ids(text))
    return None

  def params(self, **kw) -> SamplingParams:
    """SamplingParams(**kw) with the template's stop strings added (`with_stops`)."""
    return self.with_stops(SamplingParams(**kw))

  def with_stops(self, params: SamplingParams) -> SamplingParams:
    """`params` with the template's stop strings added to `stop_strings`. Stop strings that are one special
    token (ChatML's '<|im_end|>', Llama-3's '<|eot_id|>') become `stop_token_ids`: the text that stop strings
    are matched against is decoded without special tokens, so they would never be found there."""
    stops = tuple(dict.fromkeys(params.stop_strings + self.stop_strings))
    ids = [self.special_token_id(s) for s in stops]
    return dataclasses.replace(
        params, stop_strings=tuple(s for s, i in zip(stops, ids) if i is None),
        stop_token_ids=tuple(dict.fromkeys(params.stop_token_ids + tuple(i for i in ids if i is not None))))

  def preprocess(self, image: Any) -> np.ndarray:
    """A path, encoded bytes or PIL image -> float32[S, S, 3] as the config says (a numpy array passes through)."""
    if isinstance(image, np.ndarray):
      return image.astype(np.float32)
    if not hasattr(image, "size") or isinstance(image, (bytes, bytearray)):
      image = images_lib.load_image(image)
    return images_lib.preprocess_image(image, image_size=self.cfg.vision.image_size,
                                       aspect=self.cfg.image_aspect_ratio, mean=self.cfg.image_mean,
                                       std=self.cfg.image_std)

  def request(self, messages: Sequence[tuple[str, str | None]], images: Sequence[Any] = ()) -> Request:
    """A prompt from `(role, text)` messages (roles human/gpt; '<image>' tags where the images go, one per image,
    in order) and its images (paths, bytes, PIL images or preprocessed arrays)."""
    ids = tokenize.encode_prompt(messages, self.tokenizer, self.template)
    n_tags = int((ids == IMAGE_TOKEN_INDEX).sum())
    if n_tags != len(images):
      raise ValueError(f"the messages have {n_tags} '<image>' tags but {len(images)} images were given")
    pixels = np.stack([self.preprocess(im) for im in images]) if len(images) else None
    return Request(ids, pixels)

  def question(self, text: str, images: Sequence[Any] = ()) -> Request:
    """A single-turn prompt as LLaVA's eval scripts build it: '<image>\\n' per image before the text, unless the
    text already places its '<image>' tags."""
    if images and "<image>" not in text:
      text = "<image>\n" * len(images) + text
    return self.request([("human", text)], images)

  def decode(self, ids: Sequence[int]) -> str:
    return self.tokenizer.decode(list(ids), skip_special_tokens=True)

  def _finish(self, ids: np.ndarray, params: SamplingParams) -> Output:
    """Output of one row from its generated ids."""
    ids = [int(x) for x in ids]
    reason = "length"
    k = _first_end(ids, self.engine.end_ids(params))
    if k is not None:
      reason = "eos" if ids[k] in self.engine.eos_token_ids else "stop"
      ids = ids[:k]
    text = self.decode(ids)
    cut = _find_stop(text, params.stop_strings)
    if cut is not None:
      text, reason = text[:cut], "stop"
      # the fewest tokens whose text holds a stop string (containment only grows with more tokens)
      lo, hi = 1, len(ids)
      while lo < hi:
        mid = (lo + hi) // 2
        if _find_stop(self.decode(ids[:mid]), params.stop_strings) is None:
          lo = mid + 1
        else:
          hi = mid
      ids = ids[:lo]
    return Output(ids, text, reason)

  def generate(self, requests: Sequence[Request], params: SamplingParams | None = None, min_rows: int = 1
               ) -> list[Output]:
    """Generates for a batch of requests (padded to the batch bucket of max(len(requests), min_rows) rows);
    outputs in order."""
    params = params or self.params()
    engine = self.engine
    ds, n = engine.start(requests, params, min_rows)
    if not params.stop_strings:
      ds = engine.advance(ds, params, params.max_new_tokens)
      tokens, step = np.asarray(ds.tokens), int(ds.step)
      return [self._finish(tokens[i, :step], params) for i in range(n)]
    stopped = np.zeros(ds.done.shape, bool)
    stopped[n:] = True  # filler rows
    while True:
      tokens, step, done = np.asarray(ds.tokens), int(ds.step), np.asarray(ds.done)
      for i in range(n):
        if not stopped[i]:
          stopped[i] = self._finish(tokens[i, :step], params).finish_reason == "stop"
      if step >= params.max_new_tokens or np.all(stopped | done):
        return [self._finish(tokens[i, :step], params) for i in range(n)]
      ds = engine.advance(ds._replace(done=jnp.asarray(done | stopped)), params, step + params.chunk_size)

  def stream(self, request: Request, params: SamplingParams | None = None) -> Iterator[str]:
    """Generates for one request, yielding pieces of text as tokens are produced; their concatenation is the
    final `Output.text`. Text that may still turn into a stop string, or an incomplete UTF-8 character, is held
    back until it is settled."""
    params = params or self.params()
    ds, _ = self.engine.start([request], params)
    emitted = ""
    while True:
      step = int(ds.step)
      out = self._finish(np.asarray(ds.tokens)[0, :step], params)
      finished = out.finish_reason != "length" or step >= params.max_new_tokens
      settled = out.text if finished else _hold_back(out.text, params.stop_strings)
      if settled.startswith(emitted) and len(settled) > len(emitted):
        yield settled[len(emitted):]
        emitted = settled
      if finished:
        return
      ds = self.engine.advance(ds, params, step + 1)


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
  """Index of the earliest stop string in `text`, or None."""
  found = [i for i in (text.find(s) for s in stops) if i >= 0]
  return min(found) if found else None


def _hold_back(text: str, stops: Sequence[str]) -> str:
  """`text` without a trailing incomplete character or a trailing proper prefix of a stop string."""
  text = text.rstrip("\ufffd")
  keep = len(text)
  for s in stops:
    for k in range(min(len(s) - 1, len(text)), 0, -1):
      if text.endswith(s[:k]):
        keep = min(keep, len(text) - k)
        break
  return text[:keep]


def runtime_from_flag(dtype: str) -> Any:
  """RuntimeConfig for inference: 'auto' = bfloat16 on GPU/TPU, float32 on CPU."""
  if dtype == "auto":
    dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  return RuntimeConfig(param_dtype=dtype, dtype=dtype)


def add_model_flags(parser) -> None:
  """--model, --dtype, --template, --decode-attention (shared by generate, chat and eval.answer)."""
  parser.add_argument("--model", required=True, help="model folder (see llava_jax.model_folder)")
  parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                      help="parameter and compute dtype (auto: bfloat16 on accelerators, float32 on CPU)")
  parser.add_argument("--template", default=None, help="conversation template (default: the model config's)")
  parser.add_argument("--decode-attention", default="xla", choices=["xla", "pallas"],
                      help="decode steps' attention: XLA's, or JAX's Pallas flash-decoding kernel (one GPU)")


def add_sampling_flags(parser, *, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0) -> None:
  parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
  parser.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
  parser.add_argument("--top-p", type=float, default=top_p)
  parser.add_argument("--seed", type=int, default=0)


def main(argv: Sequence[str] | None = None) -> int:
  import argparse
  import sys
  parser = argparse.ArgumentParser(prog="python -m llava_jax.generate", description=__doc__.split("\n")[0])
  add_model_flags(parser)
  parser.add_argument("--image", action="append", default=[], help="image file (repeat for several images)")
  parser.add_argument("--prompt", required=True, help="the question; '<image>\\n' is put first unless present")
  add_sampling_flags(parser)
  args = parser.parse_args(argv)
  logging.use_absl_handler()
  generator = Generator.from_folder(args.model, runtime_from_flag(args.dtype), template=args.template,
                                    decode_attention=args.decode_attention)
  request = generator.question(args.prompt, args.image)
  params = generator.params(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
  out = generator.generate([request], params)[0]
  logging.info("finish_reason=%s tokens=%d", out.finish_reason, len(out.token_ids))
  sys.stdout.write(out.text.strip() + "\n")
  sys.stdout.flush()
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
