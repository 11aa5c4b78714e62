"""orbax CheckpointManager for the train state and the data iterator position.

A checkpoint holds `state` (step, trainable parameters, optimizer state; each process writes its own shards) and
`data` (every process's grain iterator state, JSON). Frozen parameters are not saved: they are re-read from the
init model folder recorded in `meta`. The train step is deterministic (no dropout), so there is no RNG to save.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
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

  def restore(self, step: int, abstract_state: Any, *, records_per_epoch: Callable[[], int] | None = None
              ) -> tuple[Any, dict, dict]:
    """-> (state placed like `abstract_state`, this process's data iterator state, meta).

    orbax reshards the state onto any mesh. A checkpoint written by another number of processes has its data
    positions converted (`reshard_data_states`), which needs `records_per_epoch()`: the records of one epoch of
    the global order.
    """
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    per_process = restored["data"]
    count, index = jax.process_count(), jax.process_index()
    if len(per_process) != count:
      if records_per_epoch is None:
        raise ValueError(f"checkpoint {self.directory}/{step} was written by {len(per_process)} processes, this run "
                         f"has {count}: give records_per_epoch to convert the data positions")
      states, left_out = reshard_data_states(per_process, records_per_epoch(), count)
      logging.warning("checkpoint %s/%d: data positions of %d processes converted for %d; %d record(s) of the "
                      "current epoch are left out (read by no process before the checkpoint, skipped now)",
                      self.directory, step, len(per_process), count, left_out)
      return restored["state"], states[index], restored["meta"]
    return restored["state"], per_process[str(index)], restored["meta"]

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


def reshard_data_states(states: dict[str, dict], records_per_epoch: int, new_count: int) -> tuple[list[dict], int]:
  """Iterator states for `new_count` processes that continue the global record order where `states` stopped.

  Process p of P reads positions p, p + P, ... of each epoch's global order (`pipeline.EpochOrderSource`,
  floor(records_per_epoch / P) per epoch), so state {"parent": {"next_index": n}} means it next reads epoch
  n // per_epoch at global position (n % per_epoch) * P + p. The new processes start at the furthest old
  position: nothing is read twice; positions before it that some process had not reached (after skipped
  records) are left out for this epoch. Skip counts are summed into process 0.

  Args:
    states: {str(process index): iterator state} as saved (grain in-process iterator, no workers).
    records_per_epoch: records in one epoch of the global order.
    new_count: processes of the resumed run.
  Returns:
    (states of processes 0..new_count-1, number of records left out).
  """
  old_count = len(states)
  if sorted(states) != [str(p) for p in range(old_count)]:
    raise ValueError(f"data states for processes {sorted(states)}: expected 0..{old_count - 1}")
  per_old, per_new = records_per_epoch // old_count, records_per_epoch // new_count
  if per_old < 1 or per_new < 1:
    raise ValueError(f"{records_per_epoch} records per epoch cannot be shared by {max(old_count, new_count)} "
                     "processes")
  next_index, skipped = [], {}
  for p in range(old_count):
    state = states[str(p)]
    parent = state.get("parent") if isinstance(state, dict) else None
    if not isinstance(parent, dict) or set(parent) != {"next_index"}:
      raise ValueError(f"process {p}'s data state {state!r} is not an in-process grain iterator state "
                       "({'parent': {'next_index': n}}); with data.worker_count > 0 resume on as many processes as "
                       "wrote the checkpoint")
    next_index.append(int(parent["next_index"]))
    for reason, n in state.get("skipped", {}).items():
      skipped[reason] = skipped.get(reason, 0) + int(n)
  epoch, k = divmod(max(next_index), per_old)
  frontier = epoch * per_old + k
  left_out = sum(frontier - n for n in next_index)
  start = k * old_count  # first global position of `epoch` not read by the furthest process
  new_states = []
  for q in range(new_count):
    k_new = min(max(-(-(start - q) // new_count), 0), per_new)
    new_states.append({"parent": {"next_index": epoch * per_new + k_new},
                       "skipped": skipped if q == 0 else {r: 0 for r in skipped}})
  return new_states, left_out
