"""AdamW with warmup + cosine, clipping, and the trainable/frozen split of the parameters (all optax)."""
from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from llava_jax import sharding

# Stage presets: which top-level parts of LlavaModel are trained (everything else is frozen).
STAGE_TRAINABLE = {1: ("projector",), 2: ("projector", "language_model")}

# No weight decay for biases and norm layers (LayerNorm scale and bias, RMSNorm weight; CLIP's `pre_layrnorm`
# too), as transformers' Trainer.get_decay_parameter_names, which LLaVA's trainer uses.
_NO_DECAY = re.compile(r"(^|\.)bias$|norm")


def trainable_filter(parts: tuple[str, ...]):
  """nnx filter: parameters under any of the named top-level parts (e.g. 'projector', 'language_model')."""
  unknown = set(parts) - {"vision_tower", "projector", "language_model"}
  if unknown:
    raise ValueError(f"unknown trainable parts {sorted(unknown)}; known: vision_tower, projector, language_model")
  return nnx.All(nnx.Param, lambda path, _: bool(path) and path[0] in parts)


def decay_mask(params: Any) -> Any:
  """True where weight decay applies: matrices and embeddings, not biases or norms (same tree as `params`, an
  nnx.State or its pure dict)."""
  return jax.tree_util.tree_map_with_path(lambda path, _: not _NO_DECAY.search(sharding.param_name(path)), params)


def learning_rate_schedule(cfg: Any, total_steps: int) -> optax.Schedule:
  """Linear warmup over warmup_ratio of the run (HF's ceil) then cosine to 0, or constant."""
  warmup = math.ceil(cfg.warmup_ratio * total_steps) if cfg.get("warmup_steps", -1) < 0 else cfg.warmup_steps
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, max(warmup, 0), max(total_steps, warmup + 1),
                                              end_value=0.0)
  if cfg.schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, max(warmup, 1)),
                                 optax.constant_schedule(cfg.learning_rate)], [warmup])
  raise ValueError(f"unknown schedule {cfg.schedule!r} (cosine | constant)")


def make_optimizer(cfg: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """clip_by_global_norm -> AdamW (decoupled decay on `decay_mask`), moments in `cfg.state_dtype`."""
  schedule = learning_rate_schedule(cfg, total_steps)
  mu_dtype = jnp.dtype(cfg.get("state_dtype", "float32"))
  tx = optax.chain(
      optax.clip_by_global_norm(cfg.max_grad_norm) if cfg.max_grad_norm > 0 else optax.identity(),
      optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask,
                  mu_dtype=mu_dtype),
  )
  return tx, schedule
