"""Tutorial: residual-stream steering with contrans_tl, step by step.

    python examples/tutorial_steering.py                  # the two offline models, ~2-4 min on CPU
    python examples/tutorial_steering.py --source DIR --target DIR --n-map-texts 40

Read it top to bottom: each step says what it does, does it with the package (and, where
it helps, by hand with TransformerLens), and prints a ``CHECK <name>: ok`` line for a
fact that must hold whatever the weights, with the number behind it. The script exits 1
if a check fails. The test suite runs it on tiny random models (tests/test_examples.py),
so it cannot silently stop working.

Steps:
    1. Load two models: a small "source" and a "target" (TransformerLens bridges).
    2. Read the residual stream after a block (``blocks.{k}.hook_resid_post``).
    3. Build a concept vector: mean of positive minus mean of negative states (Eq. 1).
    4. Add it with hooks: ``ct.steer`` (context manager) and ``run_with_hooks``; check that
       the hooked layer moved by exactly ``α·v``, earlier layers not at all, and that no
       hook is left behind.
    5. Generate steered text (KV cache, ``positions="generated"``).
    6. Fit a map between the two models' residual streams (Eq. 2) and transplant the
       vector into the target (``v̂ = v F``), then steer the target with it (Eq. 3).
    7. Look through the logit lens: what adding the vector says about the next token.
"""

import argparse
import sys

import torch

import contrans_tl as ct
from contrans_tl.analysis import aggregate_shifts, logit_lens, token_shifts
from contrans_tl.evals.emotion import REFINE_TEMPLATE, refinement_prompts, split_scenarios

FAILED: list[str] = []


def check(name: str, ok: bool, detail: str) -> None:
    """Print one check; remember failures (the script exits 1 at the end if any)."""
    print(f"CHECK {name}: {'ok' if ok else 'FAILED'} ({detail})")
    if not ok:
        FAILED.append(name)


def step(title: str) -> None:
    print(f"\n=== {title} ===")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default="smollm2-135m-instruct", help="zoo name, folder, ...")
    ap.add_argument("--target", default="gemma-3-270m", help="zoo name, folder, ...")
    ap.add_argument("--emotion", default="happiness", help="the concept to steer towards")
    ap.add_argument("--n-refine", type=int, default=20, help="positive prompts (and negatives)")
    ap.add_argument("--n-map-texts", type=int, default=200, help="WikiSplit sentences")
    ap.add_argument("--alpha", type=float, default=4.0, help="strength on the source model")
    ap.add_argument("--target-alpha", type=float, default=1.0, help="strength on the target")
    ap.add_argument("--max-new-tokens", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)

    # ------------------------------------------------------------------------------------
    step("1. Load two models")
    # ct.load_model takes an offline-zoo name, a Hugging Face folder, a .gguf file or a hub
    # id, and returns a TransformerLens TransformerBridge (the hooked model of TL 4.x) with
    # the model's provenance attached (id, revision, dtype, weight processing).
    src = ct.load_model(args.source)
    tgt = ct.load_model(args.target)
    for role, m in (("source", src), ("target", tgt)):
        p = ct.model_provenance(m)
        print(f"{role}: {p.model_id}: {m.cfg.n_layers} blocks x d_model {m.cfg.d_model}")
    k = src.cfg.n_layers // 2  # a middle block of the source
    hook = ct.resid_post_name(k)
    print(f"we work at block {k}; its residual stream is the hook point {hook!r}")

    # ------------------------------------------------------------------------------------
    step("2. Read the residual stream")
    # read_resid_post batches texts with left padding, hooks only the requested blocks,
    # keeps only the requested positions (here each text's last token) and stops the
    # forward pass after the deepest requested block.
    text = REFINE_TEMPLATE.format(scenario="You find a letter from an old friend.")
    reads = ct.read_resid_post(src, [text], layers=[k])
    state = reads.states[k][0]  # [d_model]
    # The same number the TransformerLens way: run_with_cache with a names filter.
    ids = torch.tensor([src.tokenizer(text)["input_ids"]])
    _, cache = src.run_with_cache(ids, names_filter=[hook])
    by_hand = cache[hook][0, -1]
    diff = float((state - by_hand).abs().max())
    check("read_resid_post_equals_run_with_cache", diff < 1e-4, f"max |diff| = {diff:.2e}")
    print(f"residual norm at block {k}, last token: {float(state.norm()):.2f}")

    # ------------------------------------------------------------------------------------
    step(f"3. A concept vector for {args.emotion!r} (mean difference, Eq. 1)")
    # Positive prompts: scenarios of the emotion; negatives: as many of the other five.
    split = split_scenarios(ct.emotion_scenarios(), n_fewshot=1, n_refine=args.n_refine)
    pos, neg = refinement_prompts(split, args.emotion)
    v = ct.mean_difference(src, pos, neg, concept=args.emotion)
    print(f"{len(pos)} positive and {len(neg)} negative prompts; {len(v.layers)} layers")
    print(f"|v[{k}]| = {float(v[k].norm()):.3f}  (stored with the vector: provenance)")
    # By hand: the mean of the positive states minus the mean of the negative ones.
    h = ct.read_resid_post(src, pos + neg, layers=[k]).states[k].double()
    manual = h[: len(pos)].mean(0) - h[len(pos) :].mean(0)
    diff = float((v[k].double() - manual).abs().max())
    check("mean_difference_by_hand", diff < 1e-4, f"max |diff| = {diff:.2e}")

    # ------------------------------------------------------------------------------------
    step("4. Add alpha * v with hooks")
    # ct.steer is a context manager: inside the block, α·v[k] is added to resid_post of
    # block k at every position; on leaving it (even through an exception) exactly the
    # hooks it added are removed. Here we steer block k only.
    names = [ct.resid_post_name(j) for j in range(k + 1)]
    base_logits, base_cache = src.run_with_cache(ids, names_filter=names)
    with ct.steer(src, v, alpha=args.alpha, layers=[k]):
        steered_logits, steered_cache = src.run_with_cache(ids, names_filter=names)
    added = steered_cache[hook][0] - base_cache[hook][0]  # [pos, d_model]
    err = float((added - args.alpha * v[k]).abs().max())
    # float32 rounding of h + α·v is a few units in the last place of the largest |h|
    tol = 1e-5 * max(1.0, float(base_cache[hook].abs().max()))
    check(
        "hook_adds_exactly_alpha_v",
        err < tol,
        f"every position moved by alpha*v[{k}], max error {err:.2e} (tolerance {tol:.1e})",
    )
    before = max(
        (float((steered_cache[n] - base_cache[n]).abs().max()) for n in names[:-1]), default=0.0
    )
    check("earlier_layers_unchanged", before == 0.0, f"max change before block {k}: {before}")
    # The same additions as a fwd_hooks list, for run_with_hooks (the TL idiom):
    hooks = ct.steering_hooks(src, v, args.alpha, layers=[k])
    via_run_with_hooks = src.run_with_hooks(ids, fwd_hooks=hooks)
    diff = float((via_run_with_hooks - steered_logits).abs().max())
    check("run_with_hooks_equals_steer", diff < 1e-4, f"max |diff| of logits = {diff:.2e}")
    # Nothing is left behind: the model is unsteered again.
    after = src(ids)
    diff = float((after - base_logits).abs().max())
    left = len(src.hook_dict[hook].fwd_hooks)
    check("no_hooks_left", diff == 0.0 and left == 0, f"{left} hooks on {hook}, |diff| = {diff}")

    # ------------------------------------------------------------------------------------
    step("5. Generate steered text")
    # generate() is greedy and batched, with a KV cache; positions="generated" steers only
    # the new tokens, so the first new token (predicted from the prompt) cannot change.
    prompt = "Today I went to the market and"
    plain = ct.generate(src, [prompt], max_new_tokens=args.max_new_tokens, decode=False)
    steering = ct.make_steering(src, v, args.alpha, positions="generated")
    steered = ct.generate(
        src, [prompt], max_new_tokens=args.max_new_tokens, intervention=steering, decode=False
    )
    print(f"prompt:   {prompt!r}")
    print(f"plain:    {src.tokenizer.decode(plain[0])!r}")
    print(f"steered:  {src.tokenizer.decode(steered[0])!r}   (alpha={args.alpha:g}, all layers)")
    same_first = plain[0][:1] == steered[0][:1]
    check("generated_only_keeps_first_token", same_first, "the prompt itself was not steered")
    check("generate_detaches", not steering.attached, "hooks removed after generate()")

    # ------------------------------------------------------------------------------------
    step("6. Transplant the vector into the target (Eq. 2 and 3)")
    # Both models read the same plain text; their states are paired (at word ends when
    # the tokenizers differ) and one least-squares map per layer pair is fitted, each
    # target layer paired with the source layer at the same relative depth.
    rmap = ct.fit_residual_map(src, tgt, ct.wikisplit_sentences(args.n_map_texts))
    print(f"pairing {rmap.pairing!r}, layer pairs {rmap.layer_pairs}")
    t_mid = tgt.cfg.n_layers // 2
    m = rmap.metrics.get(t_mid, {})
    print(f"held-out R² at target layer {t_mid}: {m.get('r2', float('nan')):.3f}")
    v_hat = rmap.transplant(v)  # a ConceptVector of the target model: v̂ = v F
    s_mid = rmap.source_layer(t_mid)
    manual = v[s_mid].float() @ rmap.weights[t_mid]
    diff = float((v_hat[t_mid] - manual).abs().max())
    check("transplant_is_v_times_F", diff < 1e-5, f"layer {s_mid} -> {t_mid}, |diff| {diff:.1e}")
    # Steer the target and watch the emotion's probability as the next token.
    task_text = REFINE_TEMPLATE.format(scenario="The bus was late again this morning.")
    word = tgt.tokenizer(" " + args.emotion, add_special_tokens=False)["input_ids"][0]
    t_ids = torch.tensor([tgt.tokenizer(task_text)["input_ids"]])
    p0 = float(torch.softmax(tgt(t_ids)[0, -1].float(), -1)[word])
    with ct.steer(tgt, v_hat, alpha=args.target_alpha):
        p1 = float(torch.softmax(tgt(t_ids)[0, -1].float(), -1)[word])
    print(f"P(' {args.emotion}' next) on the target: {p0:.4f} -> {p1:.4f} steered")

    # ------------------------------------------------------------------------------------
    step("7. The logit lens")
    # logit_lens reads any residual state through the model's final norm and unembedding.
    # At the last block it is the model's own next-token distribution:
    last = tgt.cfg.n_layers - 1
    name = ct.resid_post_name(last)
    logits, cache = tgt.run_with_cache(t_ids, names_filter=[name])
    lens = logit_lens(tgt, cache[name][0, -1:])[0]
    diff = float((lens - torch.softmax(logits[0, -1].float(), -1)).abs().max())
    check("logit_lens_at_last_block_is_the_output", diff < 1e-4, f"max |diff| = {diff:.2e}")
    # token_shifts: which tokens adding α·v̂ at one layer makes more and less likely,
    # counted over inputs (the paper's Table 8).
    negs = [REFINE_TEMPLATE.format(scenario=s) for s in neg[:8]]
    shifts = token_shifts(tgt, negs, v_hat, args.target_alpha, layers=[t_mid], k=10)
    up, down = aggregate_shifts(shifts[t_mid], top=8)
    print(f"target layer {t_mid}, rose most: {up}")
    print(f"target layer {t_mid}, fell most: {down}")
    check("token_shifts_one_row_per_text", len(shifts[t_mid]) == len(negs), f"{len(negs)} texts")

    print()
    if FAILED:
        print(f"{len(FAILED)} check(s) failed: {FAILED}")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
