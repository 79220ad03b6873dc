#!/usr/bin/env bash
# Build the peers' virtualenv: repeng 0.4.0 pins numpy<2 and transformers<5, so the peer
# libraries cannot share contrans_tl's environment (transformers 5.x, transformer-lens 4.x).
#
#   bash benchmarks/peers/setup.sh            # creates benchmarks/peers/.venv-peers
#   PEERS_VENV=/some/where bash benchmarks/peers/setup.sh
#
# torch is pinned to the same CPU build as the main environment (never unpinned: that
# pulls the CUDA wheels); transformers 4.57.x is the last 4.x and knows Gemma-3 text models.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${PEERS_VENV:-$HERE/.venv-peers}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q \
  "torch==2.13.0" \
  "transformers==4.57.6" \
  "numpy<2" \
  "repeng==0.4.0" \
  "steering-vectors==0.12.2" \
  "safetensors" "psutil"
"$VENV/bin/python" - <<'PY'
import numpy, repeng, steering_vectors, torch, transformers
print("peers venv ready:", "torch", torch.__version__, "transformers", transformers.__version__,
      "numpy", numpy.__version__)
PY
echo "$VENV"
