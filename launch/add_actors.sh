#!/usr/bin/env bash
# Add actors to a running tether system. They register with the broker, receive the current
# weights at the next update epoch, and only then produce rollouts.
#
#   launch/add_actors.sh CONFIG COUNT [--first-index I] [--id-prefix P] [--gpus 4,5] [broker.host=HOST key=value ...]
#
# Actor ids are <prefix>-<index> (prefix default: actor-<short host name>); an id that was used
# before is a restart of that actor. Each actor runs in the foreground group of this script;
# Ctrl-C or SIGTERM stops the ones it started (they flush what is unacked first).
# Interpreter: $TETHER_PYTHON, else the repository's .venv/bin/python, else python on PATH.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
default_python=python
[[ -x $repo/.venv/bin/python ]] && default_python=$repo/.venv/bin/python
python=${TETHER_PYTHON:-${PYTHON:-$default_python}}
[[ $# -ge 2 ]] || { sed -n '2,11p' "$0" >&2; exit 2; }
config=$1; count=$2; shift 2
first=0; gpus=""; prefix="actor-$(hostname -s)"; overrides=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --first-index) first=$2; shift 2 ;;
    --id-prefix) prefix=$2; shift 2 ;;
    --gpus) gpus=$2; shift 2 ;;
    *=*) overrides+=("$1"); shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
IFS=, read -r -a gpu_list <<<"$gpus"
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < count; i++)); do
  index=$((first + i)); gpu=${gpu_list[$i]:-}
  env ${gpu:+CUDA_VISIBLE_DEVICES=$gpu} "$python" -m tether.actor --config "$config" \
    "actor.actor_id=$prefix-$index" "${overrides[@]}" &
  pids+=($!)
done
wait
