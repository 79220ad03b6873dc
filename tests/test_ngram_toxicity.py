"""The n-gram toxicity classifier (RE-Control's reward, apart from the MiniLM judge)."""

import pytest

from contrans_tl.evals.ngram_toxicity import NgramToxicity
from contrans_tl.evals.toxicity import split_toxigen, toxigen_annotated


@pytest.fixture(scope="module")
def fitted():
    rows = toxigen_annotated()[:800]
    clf = NgramToxicity()
    clf.fit(0, examples=rows)
    return clf, rows


def test_fit_reports_held_out_rows_of_the_judges_split(fitted):
    clf, rows = fitted
    _, test = split_toxigen(rows, seed=0)
    assert clf.fit_info["held_out_ids"] == [rows[i].id for i in test]
    assert clf.metrics["n_held_out"] == len(test)
    assert clf.metrics["held_out_accuracy"] > clf.metrics["held_out_majority_accuracy"]
    p = clf.score([rows[i].text for i in test])
    want = sum((q > 0.5) == rows[i].toxic for q, i in zip(p, test)) / len(test)
    assert clf.metrics["held_out_accuracy"] == pytest.approx(want)


def test_save_load_round_trip(fitted, tmp_path):
    clf, rows = fitted
    clf.save(tmp_path / "head")
    again = NgramToxicity.load(tmp_path / "head")
    texts = [r.text for r in rows[:20]]
    assert again.score(texts) == clf.score(texts)
    with pytest.raises(TypeError, match="list of texts"):
        clf.score("one string")
    with pytest.raises(RuntimeError, match="not fitted"):
        NgramToxicity().score(["a"])
