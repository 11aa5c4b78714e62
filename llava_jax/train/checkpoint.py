"""orbax CheckpointManager for the train state and the data iterator position.

A checkpoint holds `state` (step, trainable parameters, optimizer state; each process writes its own shards) and
`data` (every process's grain iterator state, JSON). Frozen parameters are not saved: they are re-read from the
init model folder recorded in `meta`. The train step is deterministic (no dropout), so there is no RNG to save.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


class Checkpointer:
  """Periodic asynchronous saves keeping the last K, restore of the latest."""

  def __init__(self, directory: str, *, every_steps: int, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.every_steps = every_steps
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.every_steps > 0 and step % self.every_steps == 0

  def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
    """Saves (asynchronously) unless a checkpoint of this step exists."""
    if step in self.manager.all_steps():
      return
    all_data = _gather_process_states(data_state)
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(all_data), meta=ocp.args.JsonSave(meta)))

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """-> (state placed like `abstract_state`, this process's data iterator state, meta)."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    per_process = restored["data"]
    key = str(jax.process_index())
    if key not in per_process:
      raise ValueError(f"checkpoint {self.directory}/{step} has data states for processes {sorted(per_process)}, "
                       f"not for process {key} (was it written with another process count?)")
    return restored["state"], per_process[key], restored["meta"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _gather_process_states(data_state: dict) -> dict[str, dict]:
  """{process index: iterator state} of every process (process 0 writes the JSON item)."""
  if jax.process_count() == 1:
    return {"0": data_state}
  blob = json.dumps(data_state).encode()
  sizes = multihost_utils.process_allgather(np.array([len(blob)], np.int32))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:len(blob)] = np.frombuffer(blob, np.uint8)
  gathered = multihost_utils.process_allgather(padded)
  return {str(i): json.loads(bytes(gathered[i][:int(sizes[i][0])]).decode()) for i in range(len(gathered))}
