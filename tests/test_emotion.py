"""The emotion experiment: splits, prefix-cache reuse, scoring, and the CLI end to end."""

import json

import pytest
import torch

from contrans_tl.cli import main
from contrans_tl.data import EMOTIONS, emotion_scenarios
from contrans_tl.evals.emotion import (
    EmotionTask,
    Predictions,
    negatives,
    refinement_prompts,
    score,
    split_scenarios,
)
from contrans_tl.models import load_tokenizer
from contrans_tl.steering import make_steering
from contrans_tl.tokens import encode, word_end_positions


@pytest.fixture(scope="module")
def split():
    return split_scenarios(emotion_scenarios(), n_fewshot=1, n_refine=20, n_validation=5)


def test_split_parts_are_disjoint_and_deterministic(split):
    again = split_scenarios(emotion_scenarios(), n_fewshot=1, n_refine=20, n_validation=5)
    assert again == split
    for e in EMOTIONS:
        parts = [
            set(getattr(split, p)[e]) for p in ("fewshot", "refine", "validation", "evaluation")
        ]
        assert sum(len(p) for p in parts) == len(set().union(*parts))
        assert len(split.refine[e]) == 20 and len(split.evaluation[e]) >= 50


def test_refinement_and_negatives_come_from_the_right_parts(split):
    pos, neg = refinement_prompts(split, "fear")
    assert len(pos) == len(neg) == 20
    refine_other = {s for e in EMOTIONS if e != "fear" for s in split.refine[e]}
    assert all(p.split("\n")[0][len("Scenario: ") :] in split.refine["fear"] for p in pos)
    assert all(n.split("\n")[0][len("Scenario: ") :] in refine_other for n in neg)
    evaluated = negatives(split, "fear", 50)
    assert len(evaluated) == 50 and not set(evaluated) & set(split.evaluation["fear"])
    assert not set(evaluated) & {s for e in EMOTIONS for s in split.refine[e]}
    per = {e: sum(s in split.evaluation[e] for s in evaluated) for e in EMOTIONS}
    assert per["fear"] == 0 and all(per[e] == 10 for e in EMOTIONS if e != "fear")


def test_score_against_hand_count():
    ids = [11, 12, 13, 14, 15, 16]
    top = torch.tensor([14, 14, 3, 11])
    logits = torch.zeros(4, 6)
    logits[0, 3] = 1.0  # fear wins
    logits[1, 0] = 1.0  # happiness wins
    logits[2, 3] = 1.0  # fear wins though the top token is something else
    logits[3, 3] = 1.0
    s = score(Predictions(top, logits), "fear", ids)
    assert s == {"token_acc": 0.5, "logit_acc": 0.75, "n": 4}


def test_prefix_cache_reuse_equals_full_recompute(small_gemma, split):
    task = EmotionTask.build(small_gemma, split)
    q = task.query_ids(small_gemma, negatives(split, "anger", 7, "validation"))
    v = torch.randn(small_gemma.cfg.n_layers, small_gemma.cfg.d_model)
    from contrans_tl.concepts import ConceptVector
    from contrans_tl.models import model_provenance

    vec = ConceptVector(
        v, tuple(range(small_gemma.cfg.n_layers)), model_provenance(small_gemma), "anger"
    )
    for steering in (None, make_steering(small_gemma, vec, 0.5)):
        fast = task.predict(small_gemma, q, intervention=steering, batch_size=3)
        slow = task.predict(small_gemma, q, intervention=steering, batch_size=3, reuse_prefix=False)
        torch.testing.assert_close(fast.emotion_logits, slow.emotion_logits, atol=1e-4, rtol=1e-4)
        assert torch.equal(fast.top_token, slow.top_token)
        # and both equal one plain forward pass of prefix + query, one at a time
        for i, qi in enumerate(q):
            ids = torch.tensor([task.prefix_ids + qi])
            ctx = steering if steering is not None else _null()
            with ctx:
                direct = small_gemma(ids)[0, -1]
            torch.testing.assert_close(
                direct[task.emotion_ids], fast.emotion_logits[i], atol=1e-4, rtol=1e-4
            )
        if steering is not None:
            assert not steering.attached


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return None


def test_emotion_tokens_must_be_distinct(small_gemma, split, monkeypatch):
    tok = small_gemma.tokenizer
    original = tok.__call__

    def same_first_token(text, **kw):
        out = original(text, **kw)
        if text.startswith(" ") and text.strip() in EMOTIONS:
            out["input_ids"] = [5] + list(out["input_ids"][1:])
        return out

    monkeypatch.setattr(
        type(tok), "__call__", lambda self, text, **kw: same_first_token(text, **kw)
    )
    with pytest.raises(ValueError, match="not distinct"):
        EmotionTask.build(small_gemma, split)


def test_word_ends_on_two_real_tokenizers():
    """SmolLM2 (byte-level BPE, no BOS) and Gemma 3 (SentencePiece, BOS) pair by word."""
    smol = load_tokenizer("smollm2-135m-instruct")
    gemma = load_tokenizer("gemma-3-270m")
    text = "Bob 's house , built in 1890 by Jean-Luc Picard , is (famously) red ."
    es, eg = encode(smol, [text])[0], encode(gemma, [text])[0]
    ws, wg = word_end_positions(es), word_end_positions(eg)
    words = text.split()
    ends = []
    pos = 0
    for w in words:
        pos = text.index(w, pos) + len(w)
        ends.append(pos)
    common = sorted(set(ws) & set(wg))
    assert len(common) >= len(words) - 2  # at most a couple of words lack a clean end
    for w in common:
        assert es.offsets[ws[w]][1] == ends[w] == eg.offsets[wg[w]][1]
        # the token is the word's last: the next token (if any) starts at or after its end
        for enc, p in ((es, ws[w]), (eg, wg[w])):
            if p + 1 < len(enc):
                assert enc.offsets[p + 1][0] >= ends[w] - 0
    assert eg.special[0] and not es.special[0]  # Gemma adds BOS, SmolLM2 does not


def test_cli_end_to_end_on_tiny_models(tmp_path, byte_tokenizer, meta_tokenizer):
    """The CLI loads two models from local folders and writes results.json/results.md."""
    from conftest import tiny_gemma3_hf, tiny_llama_hf

    folders = []
    for name, model, tok in (
        ("src", tiny_llama_hf(byte_tokenizer), byte_tokenizer),
        ("tgt", tiny_gemma3_hf(meta_tokenizer), meta_tokenizer),
    ):
        folder = tmp_path / name
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        folders.append(str(folder))
    out = tmp_path / "out"
    code = main(
        [
            "emotion",
            "--source",
            folders[0],
            "--target",
            folders[1],
            "--out",
            str(out),
            "--alphas",
            "2",
            "--n-map-texts",
            "40",
            "--n-refine",
            "8",
            "--n-fewshot",
            "1",
            "--n-negatives",
            "5",
            "--n-validation-negatives",
            "5",
            "--pairings",
            "last,word_ends",
            "--layers",
            "1-3",
            "--cache-dir",
            str(tmp_path / "cache"),  # not the user's result cache
        ]
    )
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    methods = {r["method"] for r in res["rows"]}
    assert methods == {
        "base",
        "contrans_last",
        "contrans_word_ends",
        "self",
        "random_last",
        "random_word_ends",
    }
    for r in res["rows"]:
        assert 0 <= r["token_acc"] <= 1 and 0 <= r["logit_acc"] <= 1
        assert r["n"] == 5
    assert res["selected_alpha"]["random_last"] == res["selected_alpha"]["contrans_last"]
    assert res["protocol"]["steered_layers"] == [1, 2, 3]
    assert set(res["maps"]) == {"last", "word_ends"}
    md = (out / "results.md").read_text()
    assert "| contrans_word_ends |" in md and "Command: `python -m contrans_tl emotion" in md


def test_specificity_on_planted_confusion_matrices():
    from contrans_tl.evals.emotion import specificity

    k = len(EMOTIONS)
    # each vector moves only its own answer: specificity = Token Acc
    own = [[0.8 if i == j else 0.0 for j in range(k)] for i in range(k)]
    got = specificity(own)
    assert got["mean"] == pytest.approx(0.8) and got["on_target"] == pytest.approx(0.8)
    # a generic push: every vector makes the model answer " fear" (column 3)
    fear = EMOTIONS.index("fear")
    push = [[1.0 if j == fear else 0.0 for j in range(k)] for i in range(k)]
    got = specificity(push)
    assert got["per_emotion"]["fear"] == pytest.approx(0.0)  # Token Acc 1.0, but not specific
    assert got["on_target"] == pytest.approx(1 / k)
    # a planted mix, checked against the formula by hand for one column
    mix = [[0.1 * ((i + 2 * j) % 5) for j in range(k)] for i in range(k)]
    col = EMOTIONS.index("anger")
    others = [mix[i][col] for i in range(k) if i != col]
    want = mix[col][col] - sum(others) / (k - 1)
    assert specificity(mix)["per_emotion"]["anger"] == pytest.approx(want)
    with pytest.raises(ValueError, match="6x6"):
        specificity([[1.0] * k] * (k - 1))
