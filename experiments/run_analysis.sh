#!/usr/bin/env bash
# Regenerates experiments/results/analysis/<pair>/ (issue 5: figures + JSON + summary.md, and
# the honesty vector's token-shift tables, token_shifts_honesty_L*.md).
# Usage: bash experiments/run_analysis.sh [gemma|qwen|all|gemma-r2]
# gemma-r2 (not part of "all"): the gemma pair again, its map fitted on the best monotone
# matching of a held-out-R² layer-similarity matrix instead of relative depth.
# The map of run_alignment.py is reused when it exists (runs/maps/), else fitted.
# CPU, one core: gemma ~35 min (three steered layer sets), qwen ~60 min (the 1.5B target;
# two layer sets, four alphas).
set -euo pipefail
cd "$(dirname "$0")/.."
which="${1:-all}"
map_arg() { [[ -f "runs/maps/$1.safetensors" ]] && echo "--map runs/maps/$1" || true; }
if [[ "$which" == gemma || "$which" == all ]]; then
  # shellcheck disable=SC2046
  python -m contrans_tl analyze --source smollm2-135m-instruct --target gemma-3-270m \
    --out experiments/results/analysis/smollm2-135m-instruct__gemma-3-270m \
    $(map_arg smollm2-135m-instruct__gemma-3-270m__auto__2000) --n-map-texts 2000 \
    --layers "all;0-8;9-17"
  python experiments/honesty_token_shifts.py --source smollm2-135m-instruct \
    --target gemma-3-270m --n-map-texts 2000
fi
if [[ "$which" == qwen || "$which" == all ]]; then
  # shellcheck disable=SC2046
  python -m contrans_tl analyze --source qwen2.5-coder-0.5b-instruct \
    --target qwen2.5-coder-1.5b-instruct \
    --out experiments/results/analysis/qwen2.5-coder-0.5b-instruct__qwen2.5-coder-1.5b-instruct \
    $(map_arg qwen2.5-coder-0.5b-instruct__qwen2.5-coder-1.5b-instruct__auto__500) --n-map-texts 500 \
    --layers "all;14-27" --alphas 0.5,1,2,4
  python experiments/honesty_token_shifts.py --source qwen2.5-coder-0.5b-instruct \
    --target qwen2.5-coder-1.5b-instruct --n-map-texts 500
fi
if [[ "$which" == gemma-r2 ]]; then
  python -m contrans_tl analyze --source smollm2-135m-instruct --target gemma-3-270m \
    --out experiments/results/analysis/smollm2-135m-instruct__gemma-3-270m__match-r2 \
    --n-map-texts 2000 --layer-match r2 --layers "all;9-17"
fi
