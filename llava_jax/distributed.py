"""Multi-process start-up: one JAX process per host (TPU) or per GPU / node (SLURM), all running the same program.

`initialize()` is called first thing in `llava_jax.main`. How the processes find each other, first match wins:

  explicit   --coordinator_address / --num_processes / --process_id, or the environment variables
             LLAVA_COORDINATOR / LLAVA_NUM_PROCESSES / LLAVA_PROCESS_ID (launch/local.sh sets these);
  slurm      SLURM_JOB_ID, SLURM_NTASKS > 1 ... (srun): coordinator = first node of the step's node list;
  tpu        a Cloud TPU VM slice with more than one worker (TPU_WORKER_HOSTNAMES, or the GCE metadata server);
  single     none of these: one process, nothing to initialize.

After it, every process sees all devices (`jax.devices()`) and its own (`jax.local_devices()`). Console output,
progress bars and small-file writes belong to process 0 (`is_primary()`); checkpoints are written by every
process through orbax (each its own shards).
"""
from __future__ import annotations

import os
from typing import Mapping

from absl import flags, logging

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0's coordinator (env LLAVA_COORDINATOR); not needed on "
    "TPU pods and under SLURM.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (env LLAVA_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes) "
                                   "(env LLAVA_PROCESS_ID).")

ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "LLAVA_COORDINATOR", "LLAVA_NUM_PROCESSES", "LLAVA_PROCESS_ID"
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


class DistributedConfigError(ValueError):
  """Incomplete or inconsistent multi-process settings (names the flags / variables to set)."""


def explicit_settings(coordinator_address: str | None = None, num_processes: int | None = None,
                      process_id: int | None = None, environ: Mapping[str, str] = os.environ
                      ) -> tuple[str, int, int] | None:
  """(coordinator, num_processes, process_id) from the arguments, else the LLAVA_* environment; None if unset.

  Raises:
    DistributedConfigError: some but not all three are given, or they are inconsistent.
  """
  coordinator = coordinator_address or environ.get(ENV_COORDINATOR) or None
  count = num_processes if num_processes is not None else _int_env(environ, ENV_NUM_PROCESSES)
  index = process_id if process_id is not None else _int_env(environ, ENV_PROCESS_ID)
  given = {"coordinator_address": coordinator, "num_processes": count, "process_id": index}
  if all(v is None for v in given.values()):
    return None
  missing = [k for k, v in given.items() if v is None]
  if missing:
    raise DistributedConfigError(
        f"multi-process settings are incomplete: {', '.join(missing)} not set (flags --coordinator_address, "
        f"--num_processes, --process_id or env {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); got {given}")
  if count < 1 or not 0 <= index < count:
    raise DistributedConfigError(f"process_id {index} not in [0, num_processes={count})")
  if ":" not in coordinator:
    raise DistributedConfigError(f"coordinator_address {coordinator!r} must be host:port")
  return coordinator, count, index


def detect_mode(environ: Mapping[str, str] = os.environ, explicit: tuple | None = None) -> str:
  """'explicit' | 'slurm' | 'tpu' | 'single' (see the module docstring)."""
  if explicit is not None:
    return "explicit" if explicit[1] > 1 else "single"
  if all(v in environ for v in _SLURM_VARS) and int(environ["SLURM_NTASKS"]) > 1:
    return "slurm"
  if _tpu_multi_worker(environ):
    return "tpu"
  return "single"


def initialize_kwargs(mode: str, explicit: tuple | None, environ: Mapping[str, str] = os.environ) -> dict:
  """The arguments of `jax.distributed.initialize` for `mode` (see `detect_mode`)."""
  if mode == "explicit":
    coordinator, count, index = explicit
    return dict(coordinator_address=coordinator, num_processes=count, process_id=index)
  if mode == "slurm":
    if _slurm_tasks_on_this_node(environ) == 1:
      # One process drives all the node's GPUs: JAX's SLURM detection would give it only the GPU of its local
      # rank, so pass what it would detect and switch the detection off.
      return dict(coordinator_address=_slurm_coordinator(environ), num_processes=int(environ["SLURM_NTASKS"]),
                  process_id=int(environ["SLURM_PROCID"]), cluster_detection_method="deactivate")
    return dict(cluster_detection_method="slurm")  # one process per GPU (its local rank's)
  return {}  # tpu: JAX asks the TPU environment / metadata server


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, environ: Mapping[str, str] = os.environ) -> str:
  """Starts JAX's multi-controller runtime when this is one of several processes; -> the mode used.

  Arguments default to the flags (when parsed), then the LLAVA_* environment. Call before any JAX computation.
  """
  if flags.FLAGS.is_parsed():
    coordinator_address = coordinator_address or _COORDINATOR.value
    num_processes = num_processes if num_processes is not None else _NUM_PROCESSES.value
    process_id = process_id if process_id is not None else _PROCESS_ID.value
  explicit = explicit_settings(coordinator_address, num_processes, process_id, environ)
  mode = detect_mode(environ, explicit)
  if mode == "single":
    return mode

  import jax  # pylint: disable=g-import-not-at-top
  if jax.distributed.is_initialized():
    return mode
  # Cross-process collectives of CPU devices (multi-process CPU runs and tests); other backends ignore it.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**initialize_kwargs(mode, explicit, environ))
  logging.info("jax.distributed (%s): process %d of %d, %d local / %d global devices", mode, jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return mode


def is_primary() -> bool:
  """True in process 0 (the one that logs, shows progress and writes small files)."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def _int_env(environ: Mapping[str, str], name: str) -> int | None:
  value = environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError as e:
    raise DistributedConfigError(f"{name}={value!r} is not an integer") from e


def _slurm_tasks_on_this_node(environ: Mapping[str, str]) -> int | None:
  """Tasks of this job step on this node: SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE ('8(x2),4' style)."""
  spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
  node = int(environ.get("SLURM_NODEID", 0))
  if not spec:
    return None
  counts = []
  for part in spec.split(","):
    count, _, repeat = part.partition("(x")
    counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
  return counts[node] if node < len(counts) else None


def _slurm_coordinator(environ: Mapping[str, str]) -> str:
  """First host of the step's node list ('gpu[01-04,07],x' -> 'gpu01') and a port from the job id."""
  nodes = environ["SLURM_STEP_NODELIST"]
  head = nodes.split(",")[0] if "[" not in nodes.split(",")[0] else nodes[:nodes.index("]")]
  if "[" in head:
    prefix, ranges = head.split("[", 1)
    head = prefix + ranges.split(",")[0].split("-")[0]
  port = environ.get("JAX_COORDINATOR_PORT") or str(int(environ["SLURM_JOB_ID"]) % 2**12 + (65535 - 2**12 + 1))
  return f"{head}:{port}"


def _tpu_multi_worker(environ: Mapping[str, str]) -> bool:
  """A Cloud TPU slice with more than one worker VM (without querying anything over the network)."""
  hosts = environ.get("TPU_WORKER_HOSTNAMES") or environ.get("TPU_PROCESS_ADDRESSES")
  if hosts:
    return len([h for h in hosts.split(",") if h]) > 1
  # A TPU VM created with `gcloud compute tpus tpu-vm create` has no such variable: JAX asks the GCE metadata
  # server. libtpu is installed only on TPU VMs, and a one-worker slice initializes to process_count 1 anyway.
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))
