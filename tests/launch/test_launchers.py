"""launch/tpu_pod.sh and launch/gpu_slurm.sbatch against fake gcloud / srun / scontrol (no cloud, no cluster).

The fakes record every call and play a scenario (a preemption, a crash), so the scripts' control flow is
checked here; the commands themselves follow the gcloud and SLURM documentation (docs/scale_out.md).
"""
import os
import shlex
import stat
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TPU_POD = os.path.join(REPO, "launch", "tpu_pod.sh")
SLURM = os.path.join(REPO, "launch", "gpu_slurm.sbatch")

FAKE_GCLOUD = r"""#!/usr/bin/env bash
# State of the one fake slice in $FAKE/state (absent: no slice); ssh runs of the trainer follow $FAKE/script.
all="$*"
echo "${all//$'\n'/ }" >> "$FAKE/calls"
case " $* " in
  *" describe "*) [[ -f $FAKE/state ]] || exit 1; cat "$FAKE/state" ;;
  *" create "*) echo READY > "$FAKE/state" ;;
  *" delete "*) rm -f "$FAKE/state" ;;
  *" ssh "*llava_jax.main*)
    n=$(( $(cat "$FAKE/runs" 2>/dev/null || echo 0) + 1 )); echo "$n" > "$FAKE/runs"
    case $(sed -n "${n}p" "$FAKE/script") in
      ok) exit 0 ;;
      crash) exit 1 ;;
      preempt) echo PREEMPTED > "$FAKE/state"; exit 255 ;;
      hang) echo PREEMPTED > "$FAKE/state"; exec sleep 60 ;;  # the ssh session hangs on a vanished host
    esac ;;
esac
exit 0
"""


def _executable(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return str(path)


def _tpu_pod(tmp_path, script, **env):
  fake = tmp_path / "fake"
  fake.mkdir()
  (fake / "script").write_text("\n".join(script) + "\n")
  gcloud = _executable(tmp_path / "gcloud", FAKE_GCLOUD)
  run_env = dict(os.environ, FAKE=str(fake), GCLOUD=gcloud, TPU_NAME="llava-test", ZONE="us-east5-a",
                 ACCELERATOR_TYPE="v5p-16", RUNTIME_VERSION="v2-alpha-tpuv5", SPOT="1", WORKDIR="/mnt/llava/runs/x",
                 POLL_SECONDS="1", **env)
  proc = subprocess.run([TPU_POD, "--config=configs/stage2.py:llava-v1.5-7b", "--config.data.image_folder=/a b"],
                        env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
  calls = (fake / "calls").read_text().splitlines()
  return proc, calls


def _kinds(calls):
  out = []
  for c in calls:
    words = c.split()
    verb = words[words.index("tpu-vm") + 1]
    if verb == "ssh":
      verb = "train" if "llava_jax.main" in c else ("install" if "pip install" in c else "ssh")
    out.append(verb)
  return [k for k in out if k != "describe"]


@pytest.mark.parametrize("how", ["preempt", "hang"])
def test_tpu_pod_recreates_a_preempted_slice_and_resumes(tmp_path, how):
  proc, calls = _tpu_pod(tmp_path, [how, "ok"])
  assert proc.returncode == 0, proc.stdout.decode()
  # a missing slice is created; after the preemption it is deleted, created again, and set up again (bare workers)
  assert _kinds(calls) == ["create", "scp", "install", "train", "delete", "create", "scp", "install", "train"]
  create = next(c for c in calls if " create " in f" {c} ")
  assert "--accelerator-type v5p-16" in create and "--version v2-alpha-tpuv5" in create and "--spot" in create
  train = [c for c in calls if "llava_jax.main" in c]
  assert all("--worker=all" in c for c in train)
  command = train[-1].split("--command=", 1)[1]
  words = shlex.split(command.split("exec python -m llava_jax.main", 1)[1])
  assert words == ["--config=configs/stage2.py:llava-v1.5-7b", "--config.data.image_folder=/a b",
                   "--workdir=/mnt/llava/runs/x"]  # the same command, quoted intact, resuming in the same workdir


def test_tpu_pod_gives_up_after_repeated_crashes_on_a_ready_slice(tmp_path):
  proc, calls = _tpu_pod(tmp_path, ["crash", "crash", "ok"], CRASH_RETRIES="1")
  assert proc.returncode == 1
  # the retry reuses the slice (no new install) after stopping what the failed attempt left
  assert _kinds(calls) == ["create", "scp", "install", "train", "ssh", "train"]
  assert "giving up" in proc.stdout.decode()


FAKE_SRUN = r"""#!/usr/bin/env bash
# Runs the step's tasks here, one after the other, with the variables SLURM gives each task.
args=()
for a in "$@"; do [[ $a == --kill-on-bad-exit=* ]] || args+=("$a"); done
for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do
  for ((local = 0; local < TASKS_PER_NODE; local++)); do
    SLURM_PROCID=$((node * TASKS_PER_NODE + local)) SLURM_LOCALID=$local SLURM_NODEID=$node "${args[@]}" || exit $?
  done
done
"""
FAKE_SCONTROL = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE/scontrol"
[[ $1 == show ]] && printf 'gpu07\ngpu08\n'
exit 0
"""
FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "rank=$LLAVA_PROCESS_ID of=$LLAVA_NUM_PROCESSES coord=$LLAVA_COORDINATOR gpus=$CUDA_VISIBLE_DEVICES args=$*" \
  >> "$FAKE/tasks"
"""


def _slurm(tmp_path, tasks_per_node, **env):
  fake = tmp_path / "fake"
  fake.mkdir(exist_ok=True)
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  _executable(bin_dir / "srun", FAKE_SRUN)
  _executable(bin_dir / "scontrol", FAKE_SCONTROL)
  python = _executable(tmp_path / "python", FAKE_PYTHON)
  nodes = 2
  run_env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE=str(fake), PYTHON=python,
                 WORKDIR=str(tmp_path / "run"), SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[07-08]",
                 SLURM_JOB_NUM_NODES=str(nodes), SLURM_NTASKS=str(nodes * tasks_per_node),
                 TASKS_PER_NODE=str(tasks_per_node), CUDA_VISIBLE_DEVICES="0,1,2,3", **env)
  proc = subprocess.run(["bash", SLURM, "--config=configs/stage2.py:llava-v1.5-13b"], env=run_env,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
  assert proc.returncode == 0, proc.stdout.decode()
  scontrol = (fake / "scontrol").read_text().splitlines()
  return (fake / "tasks").read_text().splitlines(), scontrol


def test_slurm_one_process_per_gpu(tmp_path):
  tasks, scontrol = _slurm(tmp_path, 4)
  workdir = tmp_path / "run"
  expected = [f"rank={r} of=8 coord=gpu07:{20000 + 4242} gpus={r % 4} "
              f"args=-m llava_jax.main --config=configs/stage2.py:llava-v1.5-13b --workdir={workdir}"
              for r in range(8)]
  assert tasks == expected
  assert scontrol[0] == "show hostnames gpu[07-08]"
  assert scontrol[-1] == "requeue 4242"  # the trainer returned without a final model: continue in a new job


def test_slurm_one_process_per_node_sees_all_gpus_and_finished_runs_are_not_requeued(tmp_path):
  (tmp_path / "run" / "model").mkdir(parents=True)
  tasks, scontrol = _slurm(tmp_path, 1, PER_NODE="1")
  assert [t.split(" args=")[0] for t in tasks] == [f"rank={r} of=2 coord=gpu07:{20000 + 4242} gpus=0,1,2,3"
                                                   for r in range(2)]
  assert not any(c.startswith("requeue") for c in scontrol)
