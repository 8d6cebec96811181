#!/usr/bin/env bash
# Run a whole tether system on one machine: broker, N actors, a torchrun learner of R ranks.
#
#   launch/run_local.sh CONFIG [--actors N] [--learner-ranks R] [--actor-gpus 0,1] [--learner-gpus 2,3] [key=value ...]
#
# --actor-gpus gives actor i the i-th GPU of the list (CUDA_VISIBLE_DEVICES); --learner-gpus is the
# learner's CUDA_VISIBLE_DEVICES. Without them everything runs where torch finds it (CPU here).
# Ctrl-C or SIGTERM stops every process started here. Logs: <run.dir>/logs/.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python}
[[ $# -ge 1 ]] || { sed -n '2,9p' "$0" >&2; exit 2; }
config=$1; shift
actors=2; ranks=1; actor_gpus=""; learner_gpus=""; overrides=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --actors) actors=$2; shift 2 ;;
    --learner-ranks) ranks=$2; shift 2 ;;
    --actor-gpus) actor_gpus=$2; shift 2 ;;
    --learner-gpus) learner_gpus=$2; shift 2 ;;
    *=*) overrides+=("$1"); shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
run_dir=$("$python" -c 'import sys; from tether.common.config import load_config; print(load_config(sys.argv[1], sys.argv[2:]).run.dir)' "$config" "${overrides[@]}")
mkdir -p "$run_dir/logs"

pids=()
cleanup() {
  trap - INT TERM EXIT
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  sleep 5
  for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}
trap cleanup INT TERM EXIT

start() {  # start NAME CMD... in its own process group, output to the run's log folder
  local name=$1; shift
  setsid "$@" >"$run_dir/logs/$name.out" 2>&1 &
  pids+=($!)
  echo "[tether] started $name (pid $!)" >&2
}

start broker "$python" -m tether.broker --config "$config" "${overrides[@]}"
IFS=, read -r -a gpu_list <<<"$actor_gpus"
for ((i = 0; i < actors; i++)); do
  gpu=${gpu_list[$i]:-}
  start "actor-$i" env ${gpu:+CUDA_VISIBLE_DEVICES=$gpu} "$python" -m tether.actor --config "$config" "actor.actor_id=actor-$i" "${overrides[@]}"
done
start learner env ${learner_gpus:+CUDA_VISIBLE_DEVICES=$learner_gpus} \
  "$python" -m torch.distributed.run --standalone --nproc-per-node "$ranks" -m tether.learner --config "$config" "${overrides[@]}"

# The run ends when the learner does; any other daemon dying first is an error.
learner_pid=${pids[-1]}
while kill -0 "$learner_pid" 2>/dev/null; do
  for pid in "${pids[@]:0:${#pids[@]}-1}"; do
    kill -0 "$pid" 2>/dev/null || { echo "[tether] a daemon (pid $pid) exited early; see $run_dir/logs" >&2; exit 1; }
  done
  sleep 2
done
wait "$learner_pid"
