#!/usr/bin/env bash
# Regenerates experiments/results/emotion/*/results.{json,md} (issue 3).
# Usage: bash experiments/run_emotion.sh [gemma|qwen|qwen-fine|all]   (CPU: 45-75 min each)
set -euo pipefail
cd "$(dirname "$0")/.."
which="${1:-all}"
if [[ "$which" == gemma || "$which" == all ]]; then
  # SmolLM2-135M-Instruct -> Gemma-3-270m (different tokenizers): last-token maps (the
  # paper's choice) and word-end maps, 2,000 WikiSplit sentences, 50 negatives per emotion.
  python -m contrans_tl emotion --source smollm2-135m-instruct --target gemma-3-270m \
    --out experiments/results/emotion/smollm2-135m-instruct__gemma-3-270m \
    --pairings last,word_ends --alphas 0.25,0.5,1,2,4 --n-map-texts 2000 \
    --n-negatives 50 --n-validation-negatives 20
fi
if [[ "$which" == qwen || "$which" == all ]]; then
  # Qwen2.5-Coder 0.5B -> 1.5B (same tokenizer): every-token pairs. CPU budget: 500
  # sentences (every token: ~20k pairs for d_src = 896), 20 negatives per emotion, 3 alphas.
  python -m contrans_tl emotion --source qwen2.5-coder-0.5b-instruct \
    --target qwen2.5-coder-1.5b-instruct \
    --out experiments/results/emotion/qwen2.5-coder-0.5b-instruct__qwen2.5-coder-1.5b-instruct \
    --pairings all --alphas 0.25,1,4 --n-map-texts 500 \
    --n-negatives 20 --n-validation-negatives 10 --batch-size 8
fi
if [[ "$which" == qwen-fine || "$which" == all ]]; then
  # Second Qwen run: the first grid (0.25, 1, 4) jumps from the best Token Acc (alpha 1) to
  # collapse (alpha 4); this one samples between them. Same splits, seed and map settings;
  # Self is in the first run.
  python -m contrans_tl emotion --source qwen2.5-coder-0.5b-instruct \
    --target qwen2.5-coder-1.5b-instruct \
    --out experiments/results/emotion/qwen2.5-coder-0.5b-instruct__qwen2.5-coder-1.5b-instruct__alpha-1.5-3 \
    --pairings all --alphas 1.5,2,3 --n-map-texts 500 \
    --n-negatives 20 --n-validation-negatives 10 --batch-size 8 --no-self
fi
