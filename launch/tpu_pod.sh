#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create it (or reuse it), install this project on every worker, start the same
# command on all workers, and when the slice is preempted, recreate it and resume from the latest checkpoint.
#
#   TPU_NAME=llava-v5p ZONE=us-east5-a ACCELERATOR_TYPE=v5p-16 RUNTIME_VERSION=v2-alpha-tpuv5 SPOT=1 \
#   GCS_BUCKET=my-bucket WORKDIR=/mnt/llava/runs/stage2-7b \
#     launch/tpu_pod.sh --config=configs/stage2.py:llava-v1.5-7b \
#       --config.init_model=/mnt/llava/models/llava-v1.5-7b-stage2-init \
#       --config.data.data_files=/mnt/llava/data/llava_v1_5_mix665k.json --config.data.image_folder=/mnt/llava/data
#
# Arguments are passed to `python -m llava_jax.main` on every worker, with --workdir=$WORKDIR. Every worker runs one
# process (JAX finds the other workers itself: llava_jax.distributed, mode 'tpu'); the trainer resumes from the
# latest checkpoint in WORKDIR, so a restart after a preemption continues the run.
#
# Environment:
#   TPU_NAME, ZONE                  the slice (required)
#   ACCELERATOR_TYPE, RUNTIME_VERSION   to create it (required when it does not exist), e.g. v5p-16 /
#                                   v2-alpha-tpuv5, v4-32 / tpu-ubuntu2204-base
#   PROJECT                         GCP project (default: gcloud's)
#   SPOT=1                          spot capacity (cheaper, preemptible; a preempted spot slice is deleted and
#                                   created again)
#   WORKDIR                         the run's folder, the SAME path on every worker on storage all workers share
#                                   (required): each process writes its own shards of every checkpoint there
#   GCS_BUCKET, MOUNT_POINT         mount gs://GCS_BUCKET at MOUNT_POINT (default /mnt/llava) on every worker with
#                                   gcsfuse (else mount your own NFS / Filestore share at WORKDIR's location)
#   SETUP_COMMAND                   extra shell run on every worker after the install (e.g. copy data locally)
#   REMOTE_DIR                      project folder on the workers, under $HOME (default llava_jax)
#   MAX_RESTARTS (20)               slice recreations after preemptions before giving up
#   CRASH_RETRIES (1)               reruns after a failure while the slice stays READY (a bug will not go away)
#   POLL_SECONDS (60)               how often the slice's state is checked during training
#   GCLOUD (gcloud)                 the gcloud binary
set -euo pipefail

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }
log() { echo "[tpu_pod $(date '+%H:%M:%S')] $*" >&2; }

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR (a path shared by all workers)}"
gcloud_bin=${GCLOUD:-gcloud}
remote_dir=${REMOTE_DIR:-llava_jax}
mount_point=${MOUNT_POINT:-/mnt/llava}
max_restarts=${MAX_RESTARTS:-20}
crash_retries=${CRASH_RETRIES:-1}
poll=${POLL_SECONDS:-60}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[[ $# -ge 1 ]] || die "usage: $0 MAIN_ARGS... (e.g. --config=configs/stage2.py:llava-v1.5-7b)"

where=(--zone "$ZONE")
[[ -n ${PROJECT:-} ]] && where+=(--project "$PROJECT")
tpu() { "$gcloud_bin" --quiet compute tpus tpu-vm "$@"; }

state() {  # READY, CREATING, PREEMPTED, TERMINATED, ... or MISSING
  local s
  s=$(tpu describe "$TPU_NAME" "${where[@]}" --format='value(state)' 2>/dev/null) || s=MISSING
  echo "${s:-MISSING}"
}

create() {
  : "${ACCELERATOR_TYPE:?set ACCELERATOR_TYPE to create $TPU_NAME}" "${RUNTIME_VERSION:?set RUNTIME_VERSION}"
  local extra=()
  [[ ${SPOT:-0} == 1 ]] && extra+=(--spot)
  log "creating $TPU_NAME ($ACCELERATOR_TYPE, $RUNTIME_VERSION${extra[*]:+, spot})"
  tpu create "$TPU_NAME" "${where[@]}" --accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION" \
    "${extra[@]}" || log "create failed (no capacity?); retrying"
}

ensure_ready() {  # -> 0 when the slice is READY; 1 if it had to be (re)created (its workers are bare)
  local fresh=0 s
  while true; do
    s=$(state)
    case $s in
      READY) return "$fresh" ;;
      MISSING) create; fresh=1 ;;
      PREEMPTED|TERMINATED)  # spot and preempted slices cannot be restarted: delete and create
        log "$TPU_NAME is $s: deleting it"
        tpu delete "$TPU_NAME" "${where[@]}" || true
        fresh=1 ;;
      STOPPED) log "$TPU_NAME is STOPPED: starting it"; tpu start "$TPU_NAME" "${where[@]}" || true ;;
      *) log "$TPU_NAME is $s; waiting"; sleep 30 ;;
    esac
  done
}

on_all() {  # on_all COMMAND: runs a shell command on every worker at once
  tpu ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$1"
}

install() {
  local tarball
  tarball=$(mktemp -t llava_jax.XXXXXX.tar.gz)
  tar -czf "$tarball" -C "$repo" --exclude=.git --exclude='*.egg-info' --exclude=__pycache__ --exclude=runs \
    --exclude=models --exclude=data .
  log "copying the project to every worker"
  tpu scp "$tarball" "$TPU_NAME:llava_jax.tar.gz" "${where[@]}" --worker=all
  rm -f "$tarball"
  local cmd="set -e; rm -rf ~/$remote_dir; mkdir -p ~/$remote_dir; tar -xzf ~/llava_jax.tar.gz -C ~/$remote_dir"
  cmd+="; cd ~/$remote_dir; pip install -q -U 'jax[tpu]'; pip install -q -e ."
  if [[ -n ${GCS_BUCKET:-} ]]; then
    cmd+="; if ! command -v gcsfuse >/dev/null; then"
    cmd+=" echo 'deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt'"
    cmd+=" gcsfuse-\$(lsb_release -cs) main | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null;"
    cmd+=" curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg"
    cmd+=" | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null;"
    cmd+=" sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; fi"
    # orbax renames a checkpoint's temporary folder when it is complete: allow directory renames
    cmd+="; sudo mkdir -p $mount_point; sudo chown \$USER $mount_point"
    cmd+="; mountpoint -q $mount_point || gcsfuse --implicit-dirs --rename-dir-limit=1000000 $GCS_BUCKET $mount_point"
  fi
  [[ -n ${SETUP_COMMAND:-} ]] && cmd+="; $SETUP_COMMAND"
  log "installing on every worker"
  on_all "$cmd"
}

stop_stale() {  # a process left from a failed attempt would hold the TPU
  # shellcheck disable=SC2016  # expanded on the workers
  on_all 'f=/tmp/llava_jax_train.pid; if [ -f $f ] && kill -0 "$(cat $f)" 2>/dev/null; then
    kill -TERM "$(cat $f)"; sleep 20; kill -KILL "$(cat $f)" 2>/dev/null || true; fi; rm -f $f' || true
}

train() {  # runs the training on all workers; a watchdog ends the ssh when the slice stops being READY
  local args
  args=$(printf '%q ' "$@" "--workdir=$WORKDIR")
  (exec "$gcloud_bin" --quiet compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --worker=all \
    --command="cd ~/$remote_dir && echo \$\$ > /tmp/llava_jax_train.pid && exec python -m llava_jax.main $args") &
  local ssh_pid=$!  # gcloud itself, so that the watchdog's TERM reaches it
  (
    while kill -0 "$ssh_pid" 2>/dev/null; do
      sleep "$poll"
      s=$(state)
      if [[ $s != READY ]]; then
        log "$TPU_NAME is $s during training: ending the ssh session"
        kill -TERM "$ssh_pid" 2>/dev/null || true
        break
      fi
    done
  ) &
  local watchdog=$!
  local rc=0
  wait "$ssh_pid" || rc=$?
  kill "$watchdog" 2>/dev/null || true
  wait "$watchdog" 2>/dev/null || true
  return "$rc"
}

restarts=0
crashes=0
installed=0
while true; do
  if ! ensure_ready; then
    installed=0  # a new slice: bare workers
  fi
  if (( !installed )); then
    install
    installed=1
  else
    stop_stale
  fi
  log "training on all workers of $TPU_NAME (workdir $WORKDIR)"
  rc=0
  train "$@" || rc=$?
  if (( rc == 0 )); then
    log "training finished"
    exit 0
  fi
  s=$(state)
  if [[ $s == READY ]]; then
    crashes=$((crashes + 1))
    (( crashes > crash_retries )) && { log "training failed (status $rc) on a READY slice; giving up"; exit "$rc"; }
    log "training failed (status $rc) on a READY slice; retrying from the latest checkpoint"
  else
    restarts=$((restarts + 1))
    (( restarts > max_restarts )) && { log "$restarts preemptions; giving up"; exit 1; }
    log "$TPU_NAME is $s (preempted?): restart $restarts of $max_restarts from the latest checkpoint"
  fi
done
