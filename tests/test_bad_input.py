"""Bad input through the public API: refused up front, by name, with what would be valid.

Each case of :data:`CASES` is one bad input from issue 13 (causes 4-7 and the unclear
errors of the library calls); the test asserts the exception type and that the message
names the problem and a valid alternative. Steering that switched itself off (cause 2) is
tested by behaviour further down: after every public entry point that takes a
:class:`~contrans_tl.steering.Steering`, the steering is as it was before the call.

``python experiments/reliability.py`` runs this file with the other bad-input tests and
writes the counts that RELIABILITY.md quotes.
"""

import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from transformers import PreTrainedTokenizerFast

import contrans_tl as ct
from contrans_tl.baselines.proxy_tuning import proxy_generate
from contrans_tl.concepts import ConceptVector
from contrans_tl.data import emotion_scenarios, wikisplit_sentences
from contrans_tl.evals.emotion import EmotionTask, negatives, split_scenarios
from contrans_tl.evals.perplexity import perplexity
from contrans_tl.evals.toxigen import evaluate_toxigen, hate_prompts
from contrans_tl.evals.truthfulqa import evaluate_mc, load_truthfulqa, score_many
from contrans_tl.maps import LinearMapFitter, ResidualMap, evaluate_map
from contrans_tl.models import model_provenance
from contrans_tl.steering import PositionState, Steering

TEXTS = wikisplit_sentences(12)


def _vector(model: Any, seed: int = 0, concept: str = "test") -> ConceptVector:
    g = torch.Generator().manual_seed(seed)
    n, d = model.cfg.n_layers, model.cfg.d_model
    return ConceptVector(
        torch.randn(n, d, generator=g),
        tuple(range(n)),
        model_provenance(model),
        concept,
    )


def _map(source: Any, target: Any) -> ResidualMap:
    g = torch.Generator().manual_seed(1)
    ds, dt = source.cfg.d_model, target.cfg.d_model
    pairs = [(0, 0), (2, 4)]
    return ResidualMap(
        layer_pairs=pairs,
        weights={t: torch.randn(ds, dt, generator=g) for _, t in pairs},
        biases={t: torch.zeros(dt) for _, t in pairs},
        source=model_provenance(source),
        target=model_provenance(target),
        method="svd",
        pairing="last",
    )


@pytest.fixture(scope="module")
def short_model(byte_tokenizer):
    """Same shape as small_llama, but a context of 64 positions."""
    return tiny_llama(byte_tokenizer, name="tiny-llama-ctx64", n_ctx=64)


@pytest.fixture(scope="module")
def long_text():
    return " ".join(TEXTS * 8)  # several hundred tokens


# ------------------------------------------------------------------------------------------
# One case per bad input: (call, exception type, patterns the message must match: the
# problem, then a valid alternative).
# ------------------------------------------------------------------------------------------

Case = tuple[Callable[[dict[str, Any]], Any], type[Exception], tuple[str, ...]]


def _nan_vector(f: dict[str, Any]) -> ConceptVector:
    v = _vector(f["m"])
    v.vectors[1, 3] = float("nan")  # after construction, which checked it
    return v


CASES: dict[str, Case] = {
    # cause 4: non-finite strengths and vectors
    "alpha-nan": (
        lambda f: ct.make_steering(f["m"], f["v"], float("nan")),
        ValueError,
        (r"alpha must be finite", r"nan"),
    ),
    "alpha-inf": (
        lambda f: ct.make_steering(f["m"], f["v"], float("inf")),
        ValueError,
        (r"alpha must be finite", r"inf"),
    ),
    "alpha-minus-inf-in-list": (
        lambda f: ct.make_steering(f["m"], [f["v"], f["v"]], [1.0, -math.inf]),
        ValueError,
        (r"alpha\[1\] must be finite", r"-inf"),
    ),
    "alpha-nan-steer": (
        lambda f: ct.steer(f["m"], f["v"], float("nan")).__enter__(),
        ValueError,
        (r"alpha must be finite", r"nan"),
    ),
    "vector-nan-after-construction": (
        lambda f: ct.make_steering(f["m"], _nan_vector(f), 1.0),
        ValueError,
        (r"NaN or inf at layer 1", r"finite vectors"),
    ),
    # the unclear alpha errors: real numbers and 0-d tensors only
    "alpha-str-float": (
        lambda f: ct.make_steering(f["m"], f["v"], "1.0"),
        TypeError,
        (r"alpha must be a real number.*got str '1.0'", r"float\(\.\.\.\)"),
    ),
    "alpha-str-int": (
        lambda f: ct.make_steering(f["m"], f["v"], "2"),
        TypeError,
        (r"got str '2'", r"int, float or a 0-d tensor"),
    ),
    "alpha-none": (
        lambda f: ct.make_steering(f["m"], f["v"], None),
        TypeError,
        (r"got NoneType None", r"int, float or a 0-d tensor"),
    ),
    "alpha-vector-tensor": (
        lambda f: ct.make_steering(f["m"], f["v"], torch.tensor([1.0, 2.0])),
        TypeError,
        (r"tensor of shape \(2,\)", r"real number or a 0-d tensor"),
    ),
    "alpha-bool-tensor": (
        lambda f: ct.make_steering(f["m"], f["v"], torch.tensor(True)),
        TypeError,
        (r"torch.bool tensor", r"real number"),
    ),
    "alpha-complex": (
        lambda f: ct.make_steering(f["m"], f["v"], 1 + 2j),
        TypeError,
        (r"got complex", r"int, float or a 0-d tensor"),
    ),
    "vectors-not-concept-vectors": (
        lambda f: ct.make_steering(f["m"], [f["v"].vectors], 1.0),
        TypeError,
        (r"got \['Tensor'\]", r"ConceptVector"),
    ),
    # cause 5: a bare string where a sequence of texts is expected
    "mean-difference-str": (
        lambda f: ct.mean_difference(f["m"], "happy", "sad"),
        TypeError,
        (r"positive must be a list of texts, got one str \('happy'\)", r"wrap it in a list"),
    ),
    "mean-difference-str-negative": (
        lambda f: ct.mean_difference(f["m"], ["happy day"], "sad"),
        TypeError,
        (r"negative must be a list of texts, got one str", r"wrap it in a list"),
    ),
    "fit-map-str": (
        lambda f: ct.fit_residual_map(f["m"], f["g"], "some text"),
        TypeError,
        (r"texts must be a list of texts, got one str \('some text'\)", r"wrap it in a list"),
    ),
    "evaluate-map-str": (
        lambda f: evaluate_map(f["rmap"], f["m"], f["g"], "some text"),
        TypeError,
        (r"got one str", r"wrap it in a list"),
    ),
    "read-str": (
        lambda f: ct.read_resid_post(f["m"], "some text"),
        TypeError,
        (r"got one str", r"wrap it in a list"),
    ),
    "generate-str": (
        lambda f: ct.generate(f["m"], "I think that"),
        TypeError,
        (r"prompts must be a list of texts, got one str", r"wrap it in a list"),
    ),
    "perplexity-str": (
        lambda f: perplexity(f["m"], "some text"),
        TypeError,
        (r"got one str", r"wrap it in a list"),
    ),
    "proxy-generate-str": (
        lambda f: proxy_generate(f["m"], f["m"], f["m"], "I think"),
        TypeError,
        (r"prompts must be a list of texts, got one str", r"wrap it in a list"),
    ),
    "texts-with-a-non-str": (
        lambda f: ct.mean_difference(f["m"], ["fine", 3], ["sad"]),
        TypeError,
        (r"positive\[1\] is int", r"expected str"),
    ),
    # cause 6: layer indices are ints, never coerced
    "layers-str": (
        lambda f: ct.read_resid_post(f["m"], TEXTS[:2], layers="12"),
        TypeError,
        (r"got the string '12'", r"\[3, 5\].*parse_layers"),
    ),
    "layers-float": (
        lambda f: ct.read_resid_post(f["m"], TEXTS[:2], layers=[1.7]),
        TypeError,
        (r"got float 1.7", r"pass e.g. \[3, 5\]"),
    ),
    "layers-bool": (
        lambda f: ct.read_resid_post(f["m"], TEXTS[:2], layers=[True]),
        TypeError,
        (r"got the bool True", r"must be ints"),
    ),
    "layers-single-int": (
        lambda f: ct.read_resid_post(f["m"], TEXTS[:2], layers=1),
        TypeError,
        (r"got int 1", r"wrap a single layer in a list"),
    ),
    "layers-numpy-float": (
        lambda f: ct.mean_difference(f["m"], ["a b"], ["c d"], layers=[np.float64(1.0)]),
        TypeError,
        (r"got float64", r"must be ints"),
    ),
    "layers-float-tensor": (
        lambda f: ct.make_steering(f["m"], f["v"], 1.0, layers=[torch.tensor(1.0)]),
        TypeError,
        (r"torch.float32 tensor", r"must be ints"),
    ),
    "steering-layers-str": (
        lambda f: ct.make_steering(f["m"], f["v"], 1.0, layers="12"),
        TypeError,
        (r"got the string '12'", r"parse_layers"),
    ),
    "vector-layers-float": (
        lambda f: ConceptVector(f["v"].vectors[:2], (0.0, 1.0), f["v"].model, "x"),
        TypeError,
        (r"got float 0.0", r"must be ints"),
    ),
    "vector-layers-str": (
        lambda f: ConceptVector(f["v"].vectors[:2], "01", f["v"].model, "x"),
        TypeError,
        (r"layers must be a sequence of ints, got '01'", r"sequence of ints"),
    ),
    "vector-select-str": (
        lambda f: f["v"].select("12"),
        TypeError,
        (r"got '12'", r"sequence of ints"),
    ),
    "map-layer-pairs-float": (
        lambda f: ct.fit_residual_map(f["m"], f["g"], TEXTS, layer_pairs=[(1.5, 2)]),
        TypeError,
        (r"got float 1.5", r"must be ints"),
    ),
    "residual-map-pairs-bool": (
        lambda f: ResidualMap(
            [(True, 0)],
            f["rmap"].weights,
            f["rmap"].biases,
            f["rmap"].source,
            f["rmap"].target,
            "svd",
            "last",
        ),
        TypeError,
        (r"got the bool True", r"must be ints"),
    ),
    # cause 7: prompts longer than the context, and max_length < 1
    "read-longer-than-context": (
        lambda f: ct.read_resid_post(f["short"], [TEXTS[0], f["long"]]),
        ValueError,
        (r"text 1 has \d+ tokens .*at most 64 positions \(cfg.n_ctx\)", r"pass max_length"),
    ),
    "fit-map-longer-than-context": (
        lambda f: ct.fit_residual_map(
            f["short"], f["m"], [f["long"]] * 4, max_length=None, heldout_fraction=0
        ),
        ValueError,
        (r"at most 64 positions", r"max_length"),
    ),
    "max-length-zero": (
        lambda f: ct.read_resid_post(f["m"], TEXTS[:2], max_length=0),
        ValueError,
        (r"max_length must be >= 1.*got 0", r"None \(no truncation\)"),
    ),
    "max-length-negative-map": (
        lambda f: ct.fit_residual_map(f["m"], f["g"], TEXTS, max_length=-3),
        ValueError,
        (r"got -3", r"None \(no truncation\)"),
    ),
    "max-length-float": (
        lambda f: ct.read_resid_post(f["m"], TEXTS[:2], max_length=12.5),
        TypeError,
        (r"got 12.5", r"int >= 1 or None"),
    ),
    "generate-longer-than-context": (
        lambda f: ct.generate(f["short"], ["Hi there", f["long"]], max_new_tokens=4),
        ValueError,
        (r"prompt 1 has \d+ tokens.*at most 64 \(cfg.n_ctx\)", r"lower max_new_tokens"),
    ),
    "generate-prompt-plus-new-tokens": (
        lambda f: ct.generate(f["short"], [" ".join(["word"] * 40)], max_new_tokens=60),
        ValueError,
        (r"max_new_tokens=60", r"Shorten the prompt or lower max_new_tokens"),
    ),
    "perplexity-longer-than-context": (
        lambda f: perplexity(f["short"], [f["long"]], max_length=500),
        ValueError,
        (r"at most 64 positions", r"lower max_length \(now 500\)"),
    ),
    "score-many-longer-than-context": (
        lambda f: score_many(f["short"], [(list(range(1, 70)), [[5, 6]])]),
        ValueError,
        (r"item 0 has 71 tokens.*at most 64", r"shorten"),
    ),
    "generate-max-new-tokens-float": (
        lambda f: ct.generate(f["m"], ["Hi"], max_new_tokens=2.5),
        TypeError,
        (r"got 2.5", r"int >= 1"),
    ),
    # the unclear errors of the library: ridge, unmapped layers
    "ridge-nan": (
        lambda f: ct.fit_residual_map(f["m"], f["g"], TEXTS, method="ridge", ridge=float("nan")),
        ValueError,
        (r"ridge must be a finite number >= 0.*got nan", r"e.g. 1e-3"),
    ),
    "ridge-negative": (
        lambda f: ct.fit_residual_map(f["m"], f["g"], TEXTS, method="ridge", ridge=-1.0),
        ValueError,
        (r"got -1.0", r">= 0"),
    ),
    "ridge-inf-solve": (
        lambda f: _fitter().solve("ridge", ridge=float("inf")),
        ValueError,
        (r"got inf", r"finite number >= 0"),
    ),
    "ridge-str": (
        lambda f: _fitter().solve("ridge", ridge="0.1"),
        TypeError,
        (r"got str '0.1'", r"real number >= 0"),
    ),
    "map-states-unmapped-layer": (
        lambda f: f["rmap"].map_states(torch.zeros(2, f["m"].cfg.d_model), 3),
        KeyError,
        (r"target layer 3 is not mapped", r"mapped: \[0, 4\]"),
    ),
    "fit-map-batch-size-zero": (
        lambda f: ct.fit_residual_map(f["m"], f["g"], TEXTS, batch_size=0),
        ValueError,
        (r"batch_size must be >= 1, got 0", r">= 1"),
    ),
}


def _fitter() -> LinearMapFitter:
    fitter = LinearMapFitter(6, 5)
    fitter.update(torch.randn(20, 6), torch.randn(20, 5))
    return fitter


@pytest.fixture(scope="module")
def fx(small_llama, small_gemma, short_model, long_text):
    return {
        "m": small_llama,
        "g": small_gemma,
        "short": short_model,
        "long": long_text,
        "v": _vector(small_llama),
        "rmap": _map(small_llama, small_gemma),
    }


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_by_name(name, fx, as_users_run_it):
    call, exc_type, patterns = CASES[name]
    with pytest.raises(exc_type) as info:
        call(fx)
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)


def test_long_prompt_truncated_when_asked_and_valid_inputs_still_accepted(fx, as_users_run_it):
    """The refusals above have a way through: max_length truncates; integer-like layer
    indices (numpy, torch) and real-number strengths (numpy, 0-d tensors) work."""
    short = fx["short"]
    reads = ct.read_resid_post(short, [TEXTS[0], fx["long"]], [1], max_length=60)
    assert int(reads.token_index.max()) < 60
    m, v = fx["m"], fx["v"]
    ints = ct.read_resid_post(m, TEXTS[:2], layers=[0, 2]).states
    others = ct.read_resid_post(m, TEXTS[:2], layers=[np.int64(0), torch.tensor(2)]).states
    assert others.keys() == ints.keys()
    for k in ints:
        torch.testing.assert_close(others[k], ints[k], atol=0, rtol=0)
    want = ct.make_steering(m, v, 2.0).additions
    for alpha in (2, np.float32(2.0), torch.tensor(2.0), torch.tensor(2)):
        got = ct.make_steering(m, v, alpha).additions
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=0, rtol=0)


def test_addition_made_non_finite_in_place_is_refused_at_the_next_pass(fx):
    m = fx["m"]
    s = ct.make_steering(m, fx["v"], 1.0)
    ids = m.tokenizer(TEXTS[:1], return_tensors="pt")["input_ids"]
    with s:
        m(ids)  # fine
        s.additions[1][0] = float("inf")
        with pytest.raises(ValueError, match=r"blocks.1.hook_resid_post holds NaN or inf"):
            m(ids)
    assert not _our_hooks(m)


def test_tokenizer_without_pad_eos_or_bos_reads_and_generates(byte_tokenizer):
    """TransformerLens gives such a tokenizer an added ``<|endoftext|>`` outside the
    model's vocabulary; padding with it crashed in the embedding. Padding stays inside."""
    bare = PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer.backend_tokenizer)
    assert bare.pad_token_id is None and bare.eos_token_id is None
    model = tiny_llama(bare, name="tiny-llama-nopad")
    assert model.tokenizer.pad_token_id >= model.cfg.d_vocab  # what TL did
    texts = [TEXTS[0], TEXTS[1][:20]]
    batched = ct.read_resid_post(model, texts, [1], batch_size=2)
    for i, t in enumerate(texts):
        alone = ct.read_resid_post(model, [t], [1], batch_size=1)
        torch.testing.assert_close(batched.states[1][i], alone.states[1][0], atol=1e-5, rtol=1e-4)
    out = ct.generate(model, texts, max_new_tokens=3, decode=False)
    assert [len(o) for o in out] == [3, 3]


# ------------------------------------------------------------------------------------------
# Cause 2: steering never switches itself off
# ------------------------------------------------------------------------------------------


def _our_hooks(model: Any) -> int:
    points = {id(p): p for p in model.hook_dict.values()}  # aliases name one point twice
    return sum(len(p.fwd_hooks) for p in points.values())


def _last_logits(model: Any) -> torch.Tensor:
    ids = model.tokenizer(["The emotion of the scenario is"], return_tensors="pt")["input_ids"]
    return model(ids)[0, -1]


@pytest.fixture(scope="module")
def twin(byte_tokenizer):
    """A second load of the same weights as small_llama: same id, another object."""
    return tiny_llama(byte_tokenizer, d_model=48, n_layers=3, seed=0, name="tiny-llama-48")


def test_generate_inside_steer_leaves_the_block_steered(small_llama):
    m = small_llama
    base = _last_logits(m)
    with ct.steer(m, _vector(m), 4.0) as s:
        steered = _last_logits(m)
        assert not torch.allclose(steered, base, atol=1e-3)
        ct.generate(m, ["I think that"], intervention=s, max_new_tokens=3)
        torch.testing.assert_close(_last_logits(m), steered, atol=0, rtol=0)
        assert s.attached
    torch.testing.assert_close(_last_logits(m), base, atol=0, rtol=0)
    assert not s.attached and _our_hooks(m) == 0


def test_nested_same_handle_keeps_the_outer_block_steered(small_llama):
    m = small_llama
    base = _last_logits(m)
    s = ct.make_steering(m, _vector(m), 4.0)
    with s:
        steered = _last_logits(m)
        with s:
            pass
        torch.testing.assert_close(_last_logits(m), steered, atol=0, rtol=0)
        hooks_inside = _our_hooks(m)
    assert hooks_inside == m.cfg.n_layers  # one hook per steered layer, never doubled
    torch.testing.assert_close(_last_logits(m), base, atol=0, rtol=0)
    assert _our_hooks(m) == 0
    s.remove()  # an extra remove is harmless
    assert not s.attached


def test_user_hook_survives_steering(small_llama):
    m = small_llama
    seen = []
    point = m.hook_dict[ct.resid_post_name(1)]
    handle = point.add_hook(lambda x, hook: seen.append(1), dir="fwd")
    try:
        with ct.steer(m, _vector(m), 1.0):
            _last_logits(m)
        _last_logits(m)
        assert len(seen) == 2
    finally:
        handle.hook.remove()
        point.fwd_hooks[:] = [h for h in point.fwd_hooks if h is not handle]


@pytest.fixture(scope="module")
def entry_points(small_llama) -> dict[str, Callable[[Any, Steering], Any]]:
    """Every public function that takes a ``intervention=``, with small inputs."""
    split = split_scenarios(emotion_scenarios(), n_fewshot=1, n_refine=20, n_validation=5)
    task = EmotionTask.build(small_llama, split)
    queries = task.query_ids(small_llama, negatives(split, "anger", 3, "validation"))
    questions = load_truthfulqa()[:2]
    _, prompts = hate_prompts(n_validation=0, n_evaluation=1, groups=["asian"])
    prompts = [
        p.__class__(p.group, p.line, "\n".join(p.text.split("\n")[:2]) + "\n-") for p in prompts
    ]

    class Clf:
        name = "length"

        def score(self, texts):
            return [(len(t) % 10) / 9 for t in texts]

    ctx = small_llama.tokenizer("Q: Is it?\nA:")["input_ids"]
    return {
        "generate": lambda m, s: ct.generate(m, ["I think"], intervention=s, max_new_tokens=3),
        "EmotionTask.predict": lambda m, s: task.predict(m, queries, intervention=s),
        "perplexity": lambda m, s: perplexity(m, TEXTS[:3], intervention=s),
        "score_many": lambda m, s: score_many(m, [(ctx, [[5, 6], [7]])], intervention=s),
        "score_many(no prefix reuse)": lambda m, s: score_many(
            m, [(ctx, [[5, 6], [7]])], intervention=s, reuse_prefix=False
        ),
        "evaluate_mc": lambda m, s: evaluate_mc(m, questions, intervention=s, chat=False),
        "evaluate_toxigen": lambda m, s: evaluate_toxigen(
            m, prompts, Clf(), intervention=s, max_new_tokens=3, chat=False
        ),
    }


ENTRY_POINTS = [
    "generate",
    "EmotionTask.predict",
    "perplexity",
    "score_many",
    "score_many(no prefix reuse)",
    "evaluate_mc",
    "evaluate_toxigen",
]


def _snapshot(s: Steering) -> tuple[Any, ...]:
    return (
        s.attached,
        s._depth,
        s.positions,
        {k: v.clone() for k, v in s.additions.items()},
        (s.state.prompt_length, s.state.offset, s.state.attention_mask),
    )


@pytest.mark.parametrize("attached", [False, True], ids=["detached", "attached"])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("positions", ["all", "generated"])
def test_entry_point_leaves_steering_as_it_found_it(
    entry, attached, positions, small_llama, entry_points
):
    m = small_llama
    base = _last_logits(m)
    s = ct.make_steering(m, _vector(m), 4.0, positions=positions)
    if attached:
        s.attach()
    try:
        before = _snapshot(s)
        steered = _last_logits(m)
        hooks = _our_hooks(m)
        entry_points[entry](m, s)
        after = _snapshot(s)
        assert after[:3] == before[:3]
        for k in before[3]:
            torch.testing.assert_close(after[3][k], before[3][k], atol=0, rtol=0)
        assert after[4] == (None, 0, None) == before[4]
        assert _our_hooks(m) == hooks
        torch.testing.assert_close(_last_logits(m), steered, atol=0, rtol=0)
        if attached and positions == "all":
            assert not torch.allclose(steered, base, atol=1e-3)  # it still steers
    finally:
        if attached:
            s.remove()
    assert not s.attached and _our_hooks(m) == 0


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_steering_of_another_model_is_refused(entry, small_llama, twin, entry_points):
    """A steering made for ``small_llama`` would run ``twin`` unsteered: refused."""
    s = ct.make_steering(small_llama, _vector(small_llama), 4.0)
    with pytest.raises(ValueError, match=r"made for model 'tiny-llama-48'.*make_steering\(model"):
        entry_points[entry](twin, s)
    assert not s.attached and _our_hooks(twin) == 0 and _our_hooks(small_llama) == 0


def test_position_state_is_fresh_after_each_call():
    state = PositionState(prompt_length=3, offset=2, attention_mask=torch.ones(1, 4))
    state.reset()
    assert (state.prompt_length, state.offset, state.attention_mask) == (None, 0, None)
