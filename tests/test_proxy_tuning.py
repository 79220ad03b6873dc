"""EFT / proxy-tuning on tiny random models, each check against a direct computation.

No offline model set has the three models proxy-tuning needs (a strong base model and a
weak aligned / weak base pair, all with one vocabulary): SmolLM2 and both Qwen2.5-Coder
models ship as instruct models only, and Gemma-3-270m, the only base model, has its own
tokenizer. So the tests use three tiny Llamas that share one tokenizer, with different
widths, depths and seeds.
"""

import contextlib
import inspect

import pytest
import torch
from conftest import tiny_llama, tiny_llama_hf
from jaxtyping import TypeCheckError

from contrans_tl.baselines import (
    check_same_vocabulary,
    proxy_generate,
    proxy_logits,
    proxy_sequence_logprob,
    proxy_sequence_logprobs,
)
from contrans_tl.models import boot_bridge
from contrans_tl.steering import generate

PROMPTS = [
    "The cat sat on the mat .",
    "A much longer sentence about the history of the city , built in 1890 , follows here .",
    "Short one .",
    "She said that the river , which flows north , is cold .",
]


@pytest.fixture(scope="module")
def weak_base(byte_tokenizer):
    """Third model with the tokenizer of small_llama / wide_llama: 2 layers x 32."""
    return tiny_llama(byte_tokenizer, d_model=32, n_layers=2, seed=7, name="tiny-llama-32")


@pytest.fixture(scope="module")
def trio(wide_llama, small_llama, weak_base):
    """(strong, weak_aligned, weak_base)."""
    return wide_llama, small_llama, weak_base


def _ids(model, text: str) -> torch.Tensor:
    return torch.tensor([model.tokenizer(text)["input_ids"]])


def _reference_greedy(models, prompt_ids: list[int], n: int, beta: float) -> list[int]:
    """No padding, no batching, no cache: rerun the whole sequence through each model."""
    ids = list(prompt_ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            x = torch.tensor([ids])
            s, a, b = (m(x)[0, -1].double() for m in models)
            z = torch.log_softmax(s, -1) + beta * (
                torch.log_softmax(a, -1) - torch.log_softmax(b, -1)
            )
            nxt = int(z.argmax())
            out.append(nxt)
            ids.append(nxt)
    return out


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_combined_scores_equal_direct_sums(trio, beta):
    strong, aligned, base = trio
    x = _ids(strong, PROMPTS[1])
    with torch.no_grad():
        s, a, b = (m(x) for m in trio)
    z = proxy_logits(s, a, b, beta=beta)
    # EFT form: a direct sum of log-probabilities
    direct = s.log_softmax(-1) + beta * (a.log_softmax(-1) - b.log_softmax(-1))
    torch.testing.assert_close(z, direct, atol=1e-5, rtol=0)
    # proxy-tuning form (raw logits) differs by one constant per position ...
    raw = s + beta * (a - b)
    shift = z - raw
    const = -(s.logsumexp(-1) + beta * (a.logsumexp(-1) - b.logsumexp(-1)))
    torch.testing.assert_close(shift, const[..., None].expand_as(shift), atol=1e-4, rtol=0)
    # ... so both give the same distribution and the same greedy tokens
    torch.testing.assert_close(z.softmax(-1), raw.softmax(-1), atol=1e-6, rtol=0)
    assert torch.equal(z.argmax(-1), raw.argmax(-1))
    # and the shift does something: the proxy's greedy tokens are not all the strong model's
    assert not torch.equal(z.argmax(-1), s.argmax(-1))


def test_beta_zero_is_the_strong_model(trio):
    strong, aligned, base = trio
    x = _ids(strong, PROMPTS[0])
    with torch.no_grad():
        s, a, b = (m(x) for m in trio)
    torch.testing.assert_close(proxy_logits(s, a, b, beta=0.0), s.log_softmax(-1), atol=0, rtol=0)
    got = proxy_generate(*trio, PROMPTS, max_new_tokens=5, beta=0.0, decode=False)
    want = generate(strong, PROMPTS, max_new_tokens=5, decode=False)
    assert got == want


def test_logit_shapes_must_match():
    bad = (torch.zeros(2, 5), torch.zeros(2, 5), torch.zeros(2, 6))
    # the runtime type check of the tests catches this first; the function's own check
    # (what users without runtime checks see) is under it
    with pytest.raises((ValueError, TypeCheckError)):
        proxy_logits(*bad)
    with pytest.raises(ValueError, match="one shape"):
        inspect.unwrap(proxy_logits)(*bad)
    with pytest.raises(ValueError, match="finite"):
        proxy_logits(torch.zeros(5), torch.zeros(5), torch.zeros(5), beta=float("nan"))


def test_different_tokenizers_are_refused(small_llama, small_gemma, wide_llama):
    check_same_vocabulary(wide_llama, small_llama)  # one tokenizer: passes
    with pytest.raises(ValueError, match="one vocabulary") as info:
        check_same_vocabulary(wide_llama, small_llama, small_gemma)
    msg = str(info.value)
    assert "700" in msg and "900" in msg and "tokenizers differ" in msg
    with pytest.raises(ValueError, match="one vocabulary"):
        proxy_generate(wide_llama, small_llama, small_gemma, ["Hi ."], max_new_tokens=2)
    with pytest.raises(ValueError, match="one vocabulary"):
        proxy_sequence_logprob(wide_llama, small_gemma, small_llama, [5, 6], [7])


def test_different_unembedding_widths_are_refused(byte_tokenizer, small_llama):
    hf = tiny_llama_hf(byte_tokenizer, d_model=32, n_layers=2, seed=3)
    hf.resize_token_embeddings(len(byte_tokenizer) + 64)  # padded vocabulary, same tokenizer
    padded = boot_bridge(hf, byte_tokenizer, model_id="tiny-llama-padded")
    with pytest.raises(ValueError, match="one vocabulary") as info:
        check_same_vocabulary(small_llama, padded)
    assert "700" in str(info.value) and "764" in str(info.value)


def test_cached_batched_generation_equals_uncached_one_at_a_time(trio):
    n = 6
    together = proxy_generate(
        *trio, PROMPTS, max_new_tokens=n, batch_size=4, stop_at_eos=False, decode=False
    )
    alone = [
        proxy_generate(*trio, [p], max_new_tokens=n, stop_at_eos=False, decode=False)[0]
        for p in PROMPTS
    ]
    reference = [
        _reference_greedy(trio, trio[0].tokenizer(p)["input_ids"], n, 1.0) for p in PROMPTS
    ]
    assert together == alone == reference
    strong_only = generate(trio[0], PROMPTS, max_new_tokens=n, stop_at_eos=False, decode=False)
    assert together != strong_only  # the weak models' shift changes the text
    texts = proxy_generate(*trio, PROMPTS, max_new_tokens=n, stop_at_eos=False)
    assert texts == [trio[0].tokenizer.decode(r, skip_special_tokens=True) for r in together]


def test_every_model_reads_only_the_new_token_after_the_prompt(trio):
    """The KV caches are really used: after the prompt pass, each pass is one token wide."""
    seen: dict[int, list[tuple[int, int]]] = {0: [], 1: [], 2: []}

    def spy(i):
        def fn(x, *, hook):
            seen[i].append(tuple(x.shape[:2]))
            return x

        return fn

    with contextlib.ExitStack() as stack:
        for i, m in enumerate(trio):
            stack.enter_context(m.hooks(fwd_hooks=[("hook_embed", spy(i))]))
        proxy_generate(*trio, PROMPTS[:2], max_new_tokens=3, stop_at_eos=False)
    width = max(len(trio[0].tokenizer(p)["input_ids"]) for p in PROMPTS[:2])
    for i in range(3):
        assert seen[i] == [(2, width), (2, 1), (2, 1)]


def test_sequence_logprob_equals_direct_sum(trio):
    tok = trio[0].tokenizer
    contexts = [tok(p)["input_ids"] for p in PROMPTS[:3]]
    conts = [tok(" and then it rained")["input_ids"], tok(" no")["input_ids"], [5, 9, 11]]
    got = proxy_sequence_logprobs(*trio, contexts, conts, beta=1.5, batch_size=3)
    for ctx, cont, value in zip(contexts, conts, got):
        x = torch.tensor([ctx + cont])
        with torch.no_grad():
            s, a, b = (m(x)[0].double() for m in trio)
        z = (s.log_softmax(-1) + 1.5 * (a.log_softmax(-1) - b.log_softmax(-1))).log_softmax(-1)
        want = sum(float(z[len(ctx) - 1 + t, tok_id]) for t, tok_id in enumerate(cont))
        assert value == pytest.approx(want, abs=1e-4)
        one = proxy_sequence_logprob(*trio, torch.tensor(ctx), torch.tensor(cont), beta=1.5)
        assert one == pytest.approx(want, abs=1e-4)
    # beta = 0: the strong model's own log-probability
    s = trio[0](torch.tensor([contexts[0] + conts[0]]))[0].log_softmax(-1)
    want0 = sum(float(s[len(contexts[0]) - 1 + t, i]) for t, i in enumerate(conts[0]))
    got0 = proxy_sequence_logprob(*trio, contexts[0], conts[0], beta=0.0)
    assert got0 == pytest.approx(want0, abs=1e-4)


def test_bad_arguments_are_explained(trio):
    with pytest.raises(TypeError, match="wrap it in a list"):
        proxy_generate(*trio, "one prompt", max_new_tokens=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_new_tokens"):
        proxy_generate(*trio, ["x"], max_new_tokens=0)
    with pytest.raises(ValueError, match="one continuation per context"):
        proxy_sequence_logprobs(*trio, [[1, 2]], [[3], [4]])
    with pytest.raises(ValueError, match="empty"):
        proxy_sequence_logprob(*trio, [1, 2], [])
    with pytest.raises(ValueError, match="outside"):
        proxy_sequence_logprob(*trio, [1, 2], [10_000])
