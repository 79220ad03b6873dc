#!/usr/bin/env bash
# Regenerates experiments/results/alignment/ (issue 4: TruthfulQA, ToxiGen, perplexity).
# Usage: bash experiments/run_alignment.sh [gemma|qwen-gemma|qwen|all]
# CPU (one core each, two or three runs side by side): gemma ~100 min, qwen-gemma ~70 min,
# qwen ~150 min.
# A finished configuration is kept under <pair>/runs/ and reused, so a rerun resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
which="${1:-all}"
if [[ "$which" == gemma || "$which" == all ]]; then
  # SmolLM2-135M-Instruct -> Gemma-3-270m: word-end maps on 2,000 WikiSplit sentences.
  python experiments/run_alignment.py --source smollm2-135m-instruct --target gemma-3-270m \
    --n-map-texts 2000
fi
if [[ "$which" == qwen-gemma || "$which" == all ]]; then
  # Qwen2.5-Coder-0.5B-Instruct -> Gemma-3-270m: the target's Base and Inst rows are the
  # ones above (same target, same questions and prompts; read from target__gemma-3-270m);
  # Self-Align is the same as in the pair above and is not repeated.
  python experiments/run_alignment.py --source qwen2.5-coder-0.5b-instruct \
    --target gemma-3-270m --n-map-texts 1000 --parts truthfulqa,toxigen,perplexity \
    --target-methods base,inst
fi
if [[ "$which" == qwen || "$which" == all ]]; then
  # Qwen2.5-Coder 0.5B -> 1.5B (both instruct; same tokenizer, every-token maps on 500
  # sentences as in the emotion run). CPU budget (the 1.5B model reads ~5 s per question
  # and generates ~8 s per prompt on one core): TruthfulQA on 60 evaluation / 20 validation
  # questions, clean protocol only; ToxiGen reduced to a fairness vector from 10 statements
  # per group and side, 3 evaluation and 1 validation prompts per group, alpha in {0.3, 1.5};
  # perplexity for the ToxiGen alphas only (no honesty-vector perplexity). The random-direction
  # control (default --controls random) runs on the same reduced sets.
  python experiments/run_alignment.py --source qwen2.5-coder-0.5b-instruct \
    --target qwen2.5-coder-1.5b-instruct --n-map-texts 500 --protocols clean \
    --tqa-eval 60 --tqa-val 20 --parts truthfulqa,toxigen,perplexity \
    --fair-per-group 10 --tox-eval 3 --tox-val 1 --tox-alphas 0.3,1.5 --ppl-methods none
fi
