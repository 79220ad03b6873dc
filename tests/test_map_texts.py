"""Map-fitting texts (issue 17): prompt-like sources, and no evaluation item in any
experiment's fitting text."""

import pytest

from contrans_tl.data import EMOTIONS, emotion_scenarios, wikisplit_sentences
from contrans_tl.map_texts import MAP_TEXTS, fitting_texts, leaked, prompt_texts


def test_prompt_sources_look_like_prompts():
    texts = prompt_texts()
    assert all(t.endswith("is") for t in texts["scenarios"])
    assert all(t.startswith("Q: ") and t.endswith("\nA:") for t in texts["questions"])
    for name in ("dialogue", "instructions"):
        assert all(t.startswith("Human: ") and t.endswith("Assistant:") for t in texts[name])
    # the six primary emotions' scenarios are not a source (they are what is evaluated)
    primary = {s for items in emotion_scenarios().values() for s in items}
    assert not leaked(texts["scenarios"], primary)


def test_kinds_shares_and_the_default_is_the_papers_text():
    assert fitting_texts("wikisplit", 300) == wikisplit_sentences(300)
    prompts = fitting_texts("prompts", 400)
    assert len(prompts) == len(set(prompts)) == 400
    for source in prompt_texts().values():  # equal shares while every source lasts
        assert sum(t in set(source) for t in prompts) == 100
    mixed = fitting_texts("mixed", 401)
    plain = set(wikisplit_sentences())
    assert sum(t in plain for t in mixed) == 200 and len(mixed) == 401
    assert fitting_texts("prompts", 50, seed=1) != fitting_texts("prompts", 50, seed=0)


def test_excluded_items_never_enter_and_bad_requests_are_refused():
    question = prompt_texts()["questions"][0][len("Q: ") : -len("\nA:")]
    sentence = wikisplit_sentences(1)[0]
    for kind in MAP_TEXTS:
        texts = fitting_texts(kind, 1000, exclude=[question, sentence])
        assert not leaked(texts, [question, sentence])
    with pytest.raises(ValueError, match="one of"):
        fitting_texts("tweets", 10)
    with pytest.raises(ValueError, match="at most"):
        fitting_texts("prompts", 10**5)
    with pytest.raises(ValueError, match="n must be"):
        fitting_texts("prompts", 0)


@pytest.mark.parametrize("kind", MAP_TEXTS)
def test_emotion_experiment_fits_on_no_evaluation_or_validation_scenario(kind):
    from contrans_tl.pipelines.configs import EmotionConfig
    from contrans_tl.pipelines.emotion import map_fitting_texts

    config = EmotionConfig(map_texts=kind, n_map_texts=1500)
    split = config.split()
    held = [s for part in (split.validation, split.evaluation) for e in EMOTIONS for s in part[e]]
    texts = map_fitting_texts(config)
    assert len(texts) == 1500 and not leaked(texts, held)


def test_alignment_dapa_and_recontrol_maps_fit_on_no_evaluation_item():
    from contrans_tl.evals.perplexity import heldout_wikisplit
    from contrans_tl.evals.refusal import load_advbench
    from contrans_tl.evals.toxigen import hate_prompts
    from contrans_tl.evals.truthfulqa import load_truthfulqa
    from contrans_tl.pipelines.configs import DapaConfig, ReControlConfig

    val, ev = hate_prompts(n_validation=3, n_evaluation=10, seed=0)
    items = [p.text for p in [*val, *ev]]
    items += [q.question for q in load_truthfulqa()] + [r.goal for r in load_advbench()]
    for n_map in (2000, DapaConfig().n_map_texts, ReControlConfig().n_map_texts):
        texts = wikisplit_sentences(n_map)
        assert not leaked(texts, items)
        assert not set(heldout_wikisplit(100, exclude=texts)) & set(texts)  # ppl sentences
