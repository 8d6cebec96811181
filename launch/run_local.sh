#!/usr/bin/env bash
# Run a whole tether system on one machine: broker, N actors, a torchrun learner of R ranks.
#
#   launch/run_local.sh CONFIG [--actors N] [--learner-ranks R] [--actor-gpus 0-3] [--learner-gpus 4-7]
#                       [--actor-cpus 0-7] [--learner-cpus 8-15] [key=value ...]
#
# Placement (tether.launch.placement; the options set the config keys placement.*):
#   --actor-gpus   actor i gets the i-th contiguous set of actor.engine.tensor_parallel_size GPUs
#   --learner-gpus the learner's CUDA_VISIBLE_DEVICES (one rank per GPU)
#   --actor-cpus   the actors' CPUs, split between them (shared when fewer CPUs than actors); their
#                  vLLM CPU workers bind their threads there
#   --learner-cpus the learner's CPUs, shared by its ranks (torch threads per rank: CPUs / ranks)
# CPU sets stand in for GPUs where there are none: disjoint sets let actors and learner overlap.
# Interpreter: $TETHER_PYTHON, else the repository's .venv/bin/python, else python on PATH.
# Ctrl-C or SIGTERM stops every process started here. Logs: <run.dir>/logs/.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
default_python=python
[[ -x $repo/.venv/bin/python ]] && default_python=$repo/.venv/bin/python
python=${TETHER_PYTHON:-${PYTHON:-$default_python}}
[[ $# -ge 1 ]] || { sed -n '2,15p' "$0" >&2; exit 2; }
config=$1; shift
actors=2; ranks=1; overrides=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --actors) actors=$2; shift 2 ;;
    --learner-ranks) ranks=$2; shift 2 ;;
    --actor-gpus) overrides+=("placement.actor_gpus=$2"); shift 2 ;;
    --learner-gpus) overrides+=("placement.learner_gpus=$2"); shift 2 ;;
    --actor-cpus) overrides+=("placement.actor_cpus=$2"); shift 2 ;;
    --learner-cpus) overrides+=("placement.learner_cpus=$2"); shift 2 ;;
    *=*) overrides+=("$1"); shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
run_dir=$("$python" -c 'import sys; from tether.common.config import load_config; print(load_config(sys.argv[1], sys.argv[2:]).run.dir)' "$config" "${overrides[@]}")
mkdir -p "$run_dir/logs"
# Each daemon's placement: placement_prefix[NAME] (env + CPU pinning) and placement_args[NAME] (threads).
declare -A placement_prefix placement_args
eval "$("$python" -m tether.launch.placement shell --config "$config" --actors "$actors" --learner-ranks "$ranks" \
  --python "$python" "${overrides[@]}")"

pids=()
cleanup() {
  trap - INT TERM EXIT
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  sleep 5
  for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}
trap cleanup INT TERM EXIT

start() {  # start NAME CMD... in its own process group, placed, output to the run's log folder
  local name=$1; shift
  local -a prefix args
  eval "prefix=(${placement_prefix[$name]}) args=(${placement_args[$name]})"
  setsid "${prefix[@]}" "$@" "${args[@]}" >"$run_dir/logs/$name.out" 2>&1 &
  pids+=($!)
  echo "[tether] started $name (pid $!)${prefix[*]:+ with ${prefix[*]}}" >&2
}

start broker "$python" -m tether.broker --config "$config" "${overrides[@]}"
for ((i = 0; i < actors; i++)); do
  start "actor-$i" "$python" -m tether.actor --config "$config" "actor.actor_id=actor-$i" "${overrides[@]}"
done
start learner "$python" -m torch.distributed.run --standalone --nproc-per-node "$ranks" -m tether.learner \
  --config "$config" "${overrides[@]}"

# The run ends when the learner does; any other daemon dying first is an error.
learner_pid=${pids[-1]}
while kill -0 "$learner_pid" 2>/dev/null; do
  for pid in "${pids[@]:0:${#pids[@]}-1}"; do
    kill -0 "$pid" 2>/dev/null || { echo "[tether] a daemon (pid $pid) exited early; see $run_dir/logs" >&2; exit 1; }
  done
  sleep 2
done
wait "$learner_pid"
