"""llava_jax.distributed: how each kind of cluster is recognised and what jax.distributed.initialize is given."""
import pytest

from llava_jax import distributed

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[07-08,11],login1", "SLURM_NTASKS": "16",
         "SLURM_PROCID": "3", "SLURM_LOCALID": "3", "SLURM_NODEID": "0", "SLURM_STEP_TASKS_PER_NODE": "8(x2)"}


def test_explicit_settings_from_flags_or_environment():
  env = {"LLAVA_COORDINATOR": "10.0.0.1:1234", "LLAVA_NUM_PROCESSES": "4", "LLAVA_PROCESS_ID": "2"}
  assert distributed.explicit_settings(environ=env) == ("10.0.0.1:1234", 4, 2)
  assert distributed.explicit_settings("h:1", 2, 1, environ=env) == ("h:1", 2, 1)  # flags win
  assert distributed.explicit_settings(environ={}) is None
  with pytest.raises(distributed.DistributedConfigError, match="process_id"):
    distributed.explicit_settings(environ={"LLAVA_COORDINATOR": "h:1", "LLAVA_NUM_PROCESSES": "2"})
  with pytest.raises(distributed.DistributedConfigError, match="not in"):
    distributed.explicit_settings("h:1", 2, 2, environ={})
  with pytest.raises(distributed.DistributedConfigError, match="host:port"):
    distributed.explicit_settings("h", 2, 0, environ={})


def test_detect_mode():
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_NTASKS": "16", "SLURM_PROCID": "3",
           "SLURM_LOCALID": "3"}
  assert distributed.detect_mode(slurm) == "slurm"
  assert distributed.detect_mode(dict(slurm, SLURM_NTASKS="1")) == "single"
  assert distributed.detect_mode({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}) == "tpu"
  assert distributed.detect_mode({"TPU_WORKER_HOSTNAMES": "w0"}) == "single"
  assert distributed.detect_mode(slurm, explicit=("h:1", 2, 0)) == "explicit"
  assert distributed.detect_mode({}) == "single"


def test_slurm_one_process_per_gpu_uses_jax_detection():
  assert distributed.initialize_kwargs("slurm", None, SLURM) == {"cluster_detection_method": "slurm"}


def test_slurm_one_process_per_node_sees_all_its_gpus():
  env = dict(SLURM, SLURM_NTASKS="3", SLURM_PROCID="2", SLURM_LOCALID="0", SLURM_NODEID="2",
             SLURM_STEP_TASKS_PER_NODE="1(x3)")
  kwargs = distributed.initialize_kwargs("slurm", None, env)
  # JAX's own SLURM detection would restrict the process to the GPU of its local rank: switched off
  assert kwargs == {"coordinator_address": _jax_slurm_coordinator(env, None), "num_processes": 3,
                    "process_id": 2, "cluster_detection_method": "deactivate"}
  mixed = dict(SLURM, SLURM_STEP_TASKS_PER_NODE="8,1", SLURM_NODEID="1")
  assert distributed.initialize_kwargs("slurm", None, mixed)["cluster_detection_method"] == "deactivate"


@pytest.mark.parametrize("nodes", ["gpu07", "gpu07,gpu08", "gpu[07-08,11],login1", "node[001,007-015]",
                                   "a[3-4],b[1-2]"])
@pytest.mark.parametrize("port", [None, "1234"])
def test_slurm_coordinator_is_what_jax_would_detect(nodes, port, monkeypatch):
  env = dict(SLURM, SLURM_STEP_NODELIST=nodes)
  if port:
    env["JAX_COORDINATOR_PORT"] = port
  assert distributed._slurm_coordinator(env) == _jax_slurm_coordinator(env, port)


def _jax_slurm_coordinator(env, port):
  """The reference: JAX's SLURM cluster detection, reading the same variables."""
  from jax._src.clusters import slurm_cluster
  with pytest.MonkeyPatch.context() as mp:
    for key, value in env.items():
      mp.setenv(key, value)
    return slurm_cluster.SlurmCluster.get_coordinator_address(None, port)
