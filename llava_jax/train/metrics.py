"""Metrics out of the trainer: metrics.jsonl, TensorBoard events, and a console progress bar (process 0 only)."""
from __future__ import annotations

import json
import os
import sys
from typing import Any

import jax


class MetricsWriter:

  def __init__(self, workdir: str, total_steps: int, initial_step: int, *, description: str = "train"):
    self.enabled = jax.process_index() == 0
    self.jsonl = None
    self.tb = None
    self.bar = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    try:
      from tensorboardX import SummaryWriter  # TensorBoard event files without TensorFlow.
      self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:
      print("tensorboardX not installed: no TensorBoard events", file=sys.stderr)
    from tqdm import tqdm
    self.bar = tqdm(total=total_steps, initial=initial_step, desc=description, dynamic_ncols=True, file=sys.stderr,
                    mininterval=1.0)

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}
    self.jsonl.write(json.dumps(row) + "\n")
    self.jsonl.flush()
    if self.tb is not None:
      for key, value in row.items():
        if key != "step" and isinstance(value, (int, float)):
          self.tb.add_scalar(key, value, step)
      self.tb.flush()

  def progress(self, step: int, **postfix) -> None:
    if self.bar is not None:
      self.bar.n = step
      self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                           refresh=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    if self.jsonl is not None:
      self.jsonl.close()
    if self.tb is not None:
      self.tb.close()


def _plain(value: Any) -> Any:
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, bool):
    return value
  return float(value) if isinstance(value, float) else value


def last_logged(workdir: str, key: str) -> Any:
  """The last value of `key` in `workdir`/metrics.jsonl, or None (no file, or never logged)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  value = None
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      value = row.get(key, value)
  return value
