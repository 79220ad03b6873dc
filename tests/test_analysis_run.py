"""The analysis pipeline (AnalysisConfig, run_analysis), the figures it writes and
`contrans analyze`, end to end on tiny models.

Every figure must exist with its JSON, and the JSON must hold the numbers the analysis
functions return for the same inputs (recomputed here directly).
"""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from contrans_tl.analysis import (
    LayerSimilarity,
    aggregate_shifts,
    before_after_pca,
    cosine_per_layer,
    layer_similarity,
    residual_norm_profile,
    separation_by_layer,
    token_shifts,
)
from contrans_tl.analysis.plots import (
    figure_paths,
    plot_alpha_sweep,
    plot_before_after_pca,
    plot_layer_similarity,
    plot_norm_profile,
    plot_separation,
    plot_tsne,
    plot_vector_cosines,
    write_shift_table,
)
from contrans_tl.cli import main
from contrans_tl.concepts import ConceptVector
from contrans_tl.data import EMOTIONS, emotion_scenarios, wikisplit_sentences
from contrans_tl.evals.emotion import EmotionTask, negatives, score, split_scenarios
from contrans_tl.evals.perplexity import perplexity
from contrans_tl.maps import ResidualMap
from contrans_tl.pipelines.analysis import (
    AnalysisConfig,
    default_lens_layers,
    pick_alpha,
    run_analysis,
    similarity_layers,
)
from contrans_tl.steering import make_steering

FIGURES = [
    "layer_similarity",
    "vector_cosines",
    "norm_profile",
    "pca_before_after",
    "tsne",
    "separation",
    "alpha_sweep",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

SMALL = {
    "emotions": ["happiness", "fear"],
    "n_map_texts": 30,
    "n_similarity_texts": 8,
    "n_refine": 6,
    "n_fewshot": 1,
    "n_per_emotion": 4,
    "n_sweep_negatives": 3,
    "n_ppl_texts": 3,
    "n_norm_texts": 4,
    "alphas": [1.0, 4.0],
    "batch_size": 4,
}


def _png_ok(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def _load(path: Path):
    return json.loads(path.read_text())


def _no_temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*.tmp")]


@pytest.fixture(scope="module")
def analysis(small_llama, small_gemma, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    config = AnalysisConfig(
        layer_sets={"all": None, "1-3": [1, 2, 3]},
        sweep_methods=["transplanted", "random"],
        **SMALL,
    )
    res = run_analysis(small_llama, small_gemma, config, out, verbose=False)
    return out, res


def test_every_figure_has_its_png_and_json(analysis, small_gemma):
    out, res = analysis
    for name in FIGURES:
        assert _png_ok(out / f"{name}.png"), name
        data = _load(out / f"{name}.json")
        assert data["kind"] == {"pca_before_after": "before_after_pca"}.get(name, name)
    lens = default_lens_layers(small_gemma.cfg.n_layers)
    assert lens == [2, 3]
    for tl in lens:
        md = (out / f"token_shifts_L{tl}.md").read_text()
        assert "increased (token, count)" in md and "## fear: transplanted" in md
        assert _load(out / f"token_shifts_L{tl}.json")["kind"] == "token_shifts"
    assert (out / "summary.md").exists() and (out / "analysis.json").exists()
    assert _load(out / "analysis.json") == json.loads(json.dumps(res))
    assert _no_temp_files(out) == []
    summary = (out / "summary.md").read_text()
    for series in ("transplanted · layers all", "random · layers 1-3"):
        assert f"| {series} |" in summary
    for step, files in res["files"].items():
        for f in files:
            assert (out / f).exists(), (step, f)


def test_json_holds_the_numbers_of_the_analysis_functions(analysis, small_llama, small_gemma):
    out, res = analysis
    art = out / "artifacts"
    # the vectors on disk are the transplant, through the saved map, of the source vector
    rmap = ResidualMap.load(art / "residual_map")
    vec = {
        kind: {e: ConceptVector.load(art / "vectors" / f"{kind}_{e}") for e in SMALL["emotions"]}
        for kind in ("source", "transplanted", "self")
    }
    for e in SMALL["emotions"]:
        again = rmap.transplant(vec["source"][e])
        torch.testing.assert_close(again.vectors, vec["transplanted"][e].vectors)

    # cosines: cosine_per_layer of the saved vectors
    cos = _load(out / "vector_cosines.json")["cosines"]
    for e in SMALL["emotions"]:
        direct = cosine_per_layer(vec["transplanted"][e], vec["self"][e])
        assert {int(k): v for k, v in cos[e].items()} == pytest.approx(direct, abs=1e-12)

    # norm profile: residual_norm_profile on the recorded texts
    prof = _load(out / "norm_profile.json")["profiles"]
    texts = res["inputs"]["norm_texts"]
    direct = residual_norm_profile(small_gemma, texts, batch_size=SMALL["batch_size"])
    got = prof["tiny-gemma3-40: residual"]
    assert {int(k): v for k, v in got.items()} == pytest.approx(direct, rel=1e-6)

    # separation: separation_by_layer on the recorded labelled texts, same batching and seed
    sep = _load(out / "separation.json")["scores"]
    label_texts = res["inputs"]["label_texts"]
    assert list(label_texts) == list(EMOTIONS)
    direct = separation_by_layer(small_gemma, label_texts, batch_size=SMALL["batch_size"])
    for k, scores in direct.items():
        assert sep["tiny-gemma3-40"][str(k)] == pytest.approx(scores, abs=1e-9)

    # layer similarity: the same CKA matrix from layer_similarity, and the saved artifact
    sim_json = _load(out / "layer_similarity.json")
    sim = layer_similarity(
        small_llama,
        small_gemma,
        wikisplit_sentences(SMALL["n_similarity_texts"]),
        metric="cka",
        batch_size=SMALL["batch_size"],
    )
    np.testing.assert_allclose(np.array(sim_json["scores"]), sim.scores.numpy(), atol=1e-9)
    saved = LayerSimilarity.load(art / "layer_similarity")
    assert [list(p) for p in saved.best_pairs()] == sim_json["monotone_pairs"]

    # token shifts: aggregate_shifts(token_shifts(...)) with the saved vector, same texts
    tl = 3
    shifts = _load(out / f"token_shifts_L{tl}.json")["tables"]
    texts = [
        "Scenario: " + s + "\nThe emotion of the above scenario is"
        for s in res["inputs"]["negative_scenarios"]["fear"]
    ]
    up, down = aggregate_shifts(
        token_shifts(small_gemma, texts, vec["transplanted"]["fear"], 1.0, layers=[tl], k=10)[tl],
        top=15,
    )
    table = shifts[f"fear: transplanted, tiny-gemma3-40 L{tl}"]
    assert table == {"increased": [list(x) for x in up], "decreased": [list(x) for x in down]}
    sl = rmap.source_layer(tl)
    up, _ = aggregate_shifts(
        token_shifts(small_llama, texts, vec["source"]["fear"], 1.0, layers=[sl], k=10)[sl],
        top=15,
    )
    assert shifts[f"fear: source vector, tiny-llama-48 L{sl}"]["increased"] == [list(x) for x in up]


def test_alpha_sweep_numbers_recompute(analysis, small_gemma):
    out, res = analysis
    sweep = _load(out / "alpha_sweep.json")
    rows, per = sweep["rows"], res["alpha_sweep"]["per_emotion"]
    series = {r["series"] for r in rows}
    assert series == {
        f"{m} · layers {s}" for m in ("transplanted", "random") for s in ("all", "1-3")
    }
    base = [r for r in rows if r["alpha"] == 0]
    assert len(base) == 4 and len({(r["token_acc"], r["ppl"]) for r in base}) == 1
    for r in rows:
        if r["alpha"] == 0:
            continue
        mine = [
            p
            for p in per
            if p["method"] == r["method"]
            and p["layers"] == r["layers"]
            and p["alpha"] == r["alpha"]
        ]
        assert len(mine) == len(SMALL["emotions"])
        assert r["token_acc"] == pytest.approx(np.mean([p["token_acc"] for p in mine]))
        nll, n = sum(p["nll_sum"] for p in mine), sum(p["n_tokens"] for p in mine)
        assert r["ppl"] == pytest.approx(math.exp(nll / n))
    for s in series:
        assert sweep["picked"][s] == pick_alpha([r for r in rows if r["series"] == s])

    # one point by hand: the transplanted fear vector on layers 1-3 at alpha 4
    v = ConceptVector.load(out / "artifacts" / "vectors" / "transplanted_fear")
    steering = make_steering(small_gemma, v, 4.0, layers=[1, 2, 3])
    row = next(
        p
        for p in per
        if (p["method"], p["layers"], p["alpha"], p["emotion"])
        == ("transplanted", "1-3", 4.0, "fear")
    )
    ppl = perplexity(
        small_gemma, res["inputs"]["ppl_texts"], intervention=steering, batch_size=4, max_length=64
    )
    assert row["nll_sum"] == pytest.approx(ppl["nll_sum"], rel=1e-5)
    split = split_scenarios(emotion_scenarios(), n_fewshot=1, n_refine=6, n_validation=20)
    task = EmotionTask.build(small_gemma, split)
    q = task.query_ids(small_gemma, negatives(split, "fear", 3, "validation"))
    pred = task.predict(small_gemma, q, intervention=steering, batch_size=4)
    s = score(pred, "fear", task.emotion_ids)
    assert (row["token_acc"], row["logit_acc"], row["n"]) == (
        s["token_acc"],
        s["logit_acc"],
        s["n"],
    )


def test_pca_json_is_before_after_pca_of_the_states(analysis, small_gemma):
    out, res = analysis
    data = _load(out / "pca_before_after.json")
    assert len(data["before"]) == len(data["labels"]) == SMALL["n_per_emotion"]
    assert "happiness" not in data["labels"]  # negatives of happiness, the first emotion
    assert list(data["reference"]) == ["happiness"]
    from contrans_tl.activations import read_resid_post

    texts = [
        "Scenario: " + s + "\nThe emotion of the above scenario is"
        for s in res["inputs"]["negative_scenarios"]["happiness"]
    ]
    v = ConceptVector.load(out / "artifacts" / "vectors" / "transplanted_happiness")
    k = res["settings"]["pca_layer"]
    before = read_resid_post(small_gemma, texts, [k], batch_size=4).states[k]
    with make_steering(small_gemma, v, 1.0):
        after = read_resid_post(small_gemma, texts, [k], batch_size=4).states[k]
    pa = before_after_pca(before, after)
    np.testing.assert_allclose(np.array(data["before"]), pa.before, atol=1e-6)
    np.testing.assert_allclose(np.array(data["after"]), pa.after, atol=1e-6)


def test_run_analysis_refuses_bad_arguments(small_llama, small_gemma, tmp_path):
    def run(**kw):
        config = AnalysisConfig(**{**SMALL, **kw})
        return run_analysis(small_llama, small_gemma, config, tmp_path, verbose=False)

    with pytest.raises(ValueError, match="out of range"):
        run(layers_for_lens=[9])
    with pytest.raises(ValueError, match="out of range"):
        run(layer_sets={"deep": [2, 7]})
    with pytest.raises(ValueError, match="emotions must be a non-empty subset"):
        run(emotions=["joy"])
    with pytest.raises(FileNotFoundError, match="not found"):
        run(map_path=tmp_path / "no_map")
    with pytest.raises(ValueError, match="map_path loads a map with its own pairs"):
        run(map_path=tmp_path / "no_map", layer_match="r2")
    assert not any(tmp_path.iterdir())  # refused before writing anything


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"alphas": []}, "alphas is empty"),
        ({"alphas": [0.0, 1.0]}, "finite number > 0"),
        ({"alphas": [float("nan")]}, "finite number > 0"),
        ({"alpha": 0.0}, "non-zero"),
        ({"emotions": []}, "non-empty subset"),
        ({"emotions": ["fear", "fear"]}, "distinct"),
        ({"pca_emotion": "anger", "emotions": ["fear"]}, "pca_emotion"),
        ({"n_per_emotion": 2}, "n_per_emotion must be an integer >= 3"),
        ({"n_map_texts": 5}, "n_map_texts must be an integer >= 10"),
        ({"n_ppl_texts": -1}, "n_ppl_texts"),
        ({"sweep_methods": ["transplanted", "bogus"]}, "sweep_methods"),
        ({"map_pairing": "tokens"}, "map_pairing"),
        ({"map_method": "lstsq"}, "map_method"),
        ({"layer_match": "cosine"}, "layer_match must be one of"),
        ({"similarity_max_gb": 0.0}, "similarity_max_gb"),
        ({"tsne_perplexity": 1000.0}, "below the number of points"),
        ({"max_ppl_ratio": 0.5}, "max_ppl_ratio"),
        ({"n_refine": 400}, "needs at least"),
        ({"n_per_emotion": 150, "n_refine": 50}, "lower n_per_emotion"),
        ({"ppl_max_length": 1}, "ppl_max_length must be >= 2"),
        ({"layer_sets": {}}, "layer_sets is empty"),
        ({"map_path": "m", "layer_match": "cka"}, "map_path loads a map with its own pairs"),
    ],
)
def test_analysis_config_refuses_bad_settings(kw, message):
    with pytest.raises(ValueError, match=message):
        AnalysisConfig(**kw)


def test_analysis_config_is_frozen_normalised_and_documented():
    config = AnalysisConfig(
        emotions=["fear", "anger"],
        alphas=[2, 0.5, 2.0],
        sweep_methods=["self"],
        layer_sets={"all": None, "mid": range(1, 3)},
        layers_for_lens=[3, 1],
    )
    assert config.emotions == ("fear", "anger") and config.sweep_methods == ("self",)
    assert config.alphas == (0.5, 2.0)
    assert config.layer_sets == (("all", None), ("mid", (1, 2)))
    assert config.layer_set_dict() == {"all": None, "mid": (1, 2)}
    assert config.layers_for_lens == (3, 1)  # sorted and checked against the target later
    assert AnalysisConfig(layer_sets=None).layer_sets == (("all", None),)
    assert dataclasses.replace(config) == config and hash(dataclasses.replace(config)) == hash(
        config
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.alpha = 2.0  # type: ignore[misc]
    for f in dataclasses.fields(AnalysisConfig):
        assert f.metadata.get("help"), f.name  # the CLI's help text


def test_analysis_package_is_a_library():
    # contrans_tl.analysis imports nothing from the evaluations or the pipelines
    import ast

    folder = Path(__file__).resolve().parents[1] / "contrans_tl" / "analysis"
    assert not (folder / "run.py").exists()
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not name.startswith(("contrans_tl.evals", "contrans_tl.pipelines")), (
                    path.name,
                    name,
                )


def test_similarity_layers_fit_the_budget():
    s, t = similarity_layers(30, 18, 576, 640, max_gb=1.0)
    need = 8 * (len(s) * 576 * len(t) * 640 + len(s) * 576**2 + len(t) * 640**2)
    assert need <= 2**30 and len(s) == 18 and t == list(range(18))
    assert s[0] == 0 and s[-1] == 29 and s == sorted(set(s))
    assert similarity_layers(3, 5, 48, 40, max_gb=1.0) == ([0, 1, 2], [0, 1, 2, 3, 4])
    s, t = similarity_layers(30, 18, 576, 640, max_gb=0.01)
    assert len(s) >= 2 and len(t) >= 2 and s[-1] == 29 and t[-1] == 17


def test_pick_alpha():
    rows = [
        {"alpha": 0.0, "token_acc": 0.1, "ppl": 20.0},
        {"alpha": 1.0, "token_acc": 0.6, "ppl": 25.0},
        {"alpha": 2.0, "token_acc": 0.6, "ppl": 29.0},
        {"alpha": 4.0, "token_acc": 0.9, "ppl": 300.0},
    ]
    assert pick_alpha(rows) == 1.0  # tie at 0.6 goes to the smaller alpha; 4 is not fluent
    assert pick_alpha(rows, max_ppl_ratio=20) == 4.0
    assert pick_alpha([{**r, "ppl": None} for r in rows]) == 4.0  # no fluency: effect only
    assert pick_alpha(rows[:1] + [{"alpha": 1.0, "token_acc": 0.5, "ppl": 99.0}]) is None


# --- the plotting functions on their own -------------------------------------------------


def test_plots_write_what_they_draw(tmp_path):
    sim = LayerSimilarity(
        scores=torch.tensor([[0.9, 0.2, float("nan")], [0.1, 0.8, 0.7]], dtype=torch.float64),
        source_layers=(0, 2),
        target_layers=(0, 1, 2),
        metric="cka",
    )
    png, js = plot_layer_similarity(sim, tmp_path / "sim.png")
    assert png == tmp_path / "sim.png" and _png_ok(png)
    data = _load(js)
    assert data["scores"][0][2] is None and data["scores"][1][1] == 0.8
    assert data["monotone_pairs"] == [[0, 0], [2, 1], [2, 2]]
    assert data["depth_pairs"] == [[0, 0], [1, 1], [2, 2]]  # source layer 1 is interpolated

    cos = {"fear": {0: 0.5, 1: float("nan"), 2: -0.25}, "joy": {1: 0.25, 2: 0.75}}
    _, js = plot_vector_cosines(cos, tmp_path / "cos")
    data = _load(js)
    assert data["cosines"]["fear"] == {"0": 0.5, "1": None, "2": -0.25}
    assert data["mean"] == {"0": 0.5, "1": 0.25, "2": 0.25}

    _, js = plot_norm_profile(
        {"a": {0: 1.0, 1: 2.0}, "b": {0: 3.0}}, tmp_path / "n", n_layers={"b": 4}
    )
    data = _load(js)
    assert data["n_layers"] == {"a": 2, "b": 4}
    assert data["relative_depth"]["b"] == {"0": 0.25}

    rng = np.random.default_rng(0)
    b = rng.normal(size=(6, 5))
    pa = before_after_pca(b, b + 1.0)
    _, js = plot_before_after_pca(pa, list("aabbcc"), tmp_path / "pca")
    data = _load(js)
    np.testing.assert_allclose(data["after"], pa.after)
    assert data["labels"] == list("aabbcc")

    xy = rng.normal(size=(4, 2))
    _, js = plot_tsne({"m1": xy, "m2": 2 * xy}, ["x", "y", "x", "y"], tmp_path / "tsne")
    data = _load(js)
    np.testing.assert_allclose(data["panels"]["m2"]["coords"], 2 * xy)
    _, js = plot_tsne(xy, ["x", "y", "x", "y"], tmp_path / "tsne1")
    assert list(_load(js)["panels"]) == [""]

    sep = {"m": {0: {"silhouette": 0.1, "probe_accuracy": 0.5, "chance": 0.5}}}
    _, js = plot_separation(sep, tmp_path / "sep")
    assert _load(js)["scores"]["m"]["0"]["probe_accuracy"] == 0.5

    rows = [
        {"series": "s", "alpha": 0.0, "token_acc": 0.1, "ppl": 10.0},
        {"series": "s", "alpha": 0.5, "token_acc": 0.4, "ppl": 12.0},
        {"series": "s", "alpha": 8.0, "token_acc": 0.9, "ppl": None},
    ]
    _, js = plot_alpha_sweep(rows, tmp_path / "sweep", picked={"s": 0.5})
    data = _load(js)
    assert data["rows"] == rows and data["picked"] == {"s": 0.5}
    assert _no_temp_files(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{n}.{ext}"
        for n in ("sim", "cos", "n", "pca", "tsne", "tsne1", "sep", "sweep")
        for ext in ("png", "json")
    )


def test_shift_table_format(tmp_path):
    up = [(" happy", 41), ("a|b", 3)]
    down = [("\n", 7)]
    md, js = write_shift_table({"fear L3": (up, down)}, tmp_path / "t", note="how")
    text = md.read_text()
    assert md.name == "t.md" and "## fear L3" in text and "how" in text
    assert '| 1 | (" happy", 41) | ("\\n", 7) |' in text
    assert '| 2 | ("a\\|b", 3) |  |' in text
    assert _load(js)["tables"]["fear L3"] == {
        "increased": [[" happy", 41], ["a|b", 3]],
        "decreased": [["\n", 7]],
    }
    md, _ = write_shift_table((up, down), tmp_path / "single")
    assert "##" not in md.read_text()


def test_plot_errors(tmp_path):
    with pytest.raises(ValueError, match="3 points but 2 labels"):
        plot_tsne(np.zeros((3, 2)), ["a", "b"], tmp_path / "x")
    with pytest.raises(ValueError, match="must be \\[n, 2\\]"):
        plot_tsne(np.zeros((3, 3)), ["a", "b", "c"], tmp_path / "x")
    with pytest.raises(ValueError, match="lacks \\['token_acc'\\]"):
        plot_alpha_sweep([{"alpha": 1.0, "acc": 0.3}], tmp_path / "x")
    with pytest.raises(ValueError, match="no rows"):
        plot_alpha_sweep([], tmp_path / "x")
    with pytest.raises(ValueError, match="no cosine series"):
        plot_vector_cosines({}, tmp_path / "x")
    with pytest.raises(ValueError, match="lack \\['probe_accuracy'\\]"):
        plot_separation({"m": {0: {"silhouette": 0.1}}}, tmp_path / "x")
    with pytest.raises(ValueError, match="n_layers"):
        plot_norm_profile({"a": {5: 1.0}}, tmp_path / "x", n_layers={"a": 3})
    pa = before_after_pca(np.eye(3), np.eye(3) * 2)
    with pytest.raises(ValueError, match="2 labels for 3 inputs"):
        plot_before_after_pca(pa, ["a", "b"], tmp_path / "x")
    assert not any(tmp_path.iterdir())
    assert figure_paths("out/sweep_a0.5") == (
        Path("out/sweep_a0.5.png"),
        Path("out/sweep_a0.5.json"),
    )
    assert figure_paths("out/t.md", ".md") == (Path("out/t.md"), Path("out/t.json"))


# --- the command -----------------------------------------------------------------------


CLI_SMALL = [
    "--n-map-texts",
    "30",
    "--n-similarity-texts",
    "8",
    "--n-refine",
    "6",
    "--n-fewshot",
    "1",
    "--n-per-emotion",
    "4",
    "--n-sweep-negatives",
    "3",
    "--n-ppl-texts",
    "2",
    "--n-norm-texts",
    "3",
    "--batch-size",
    "4",
]


def test_cli_end_to_end(folders, tmp_path, capsys, small_llama, small_gemma):
    src, tgt = folders
    out = tmp_path / "run1"
    code = main(
        [
            "analyze",
            "--source",
            src,
            "--target",
            tgt,
            "--out",
            str(out),
            "--emotions",
            "sadness,anger",
            "--alphas",
            "0.5,2",
            "--layers",
            "all;2-4",
            "--lens-layers",
            "1,4",
            "--pca-layer",
            "2",
            "--sweep-methods",
            "self",
            *CLI_SMALL,
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "self · layers 2-4" in printed
    assert f"figures, analysis.json and summary.md in {out}" in printed
    for name in FIGURES:
        assert _png_ok(out / f"{name}.png") and (out / f"{name}.json").exists(), name
    assert (out / "token_shifts_L1.md").exists() and (out / "token_shifts_L4.md").exists()
    res = _load(out / "analysis.json")
    assert res["command"].startswith("python -m contrans_tl analyze --source")
    st = res["settings"]
    assert st["emotions"] == ["sadness", "anger"] and st["alphas"] == [0.5, 2.0]
    assert st["layer_sets"] == {"all": "all", "2-4": [2, 3, 4]}
    assert st["layers_for_lens"] == [1, 4] and st["pca_layer"] == 2
    assert {r["series"] for r in res["alpha_sweep"]["rows"]} == {
        "self · layers all",
        "self · layers 2-4",
    }
    assert res["map"]["fitted_on_texts"] == 30

    # a second run reuses the saved map, and the map refuses other models
    map_path = out / "artifacts" / "residual_map"
    out2 = tmp_path / "run2"
    code = main(
        ["analyze", "--source", src, "--target", tgt, "--out", str(out2), "--map", str(map_path)]
        + ["--emotions", "fear", "--alphas", "1", *CLI_SMALL]
    )
    assert code == 0
    res2 = _load(out2 / "analysis.json")
    assert res2["map"]["loaded_from"] == str(map_path)
    assert res2["map"]["layer_pairs"] == res["map"]["layer_pairs"]
    assert not (out2 / "artifacts" / "residual_map.json").exists()
    with pytest.raises(ValueError, match="map's source side"):
        config = AnalysisConfig(map_path=map_path, **SMALL)
        run_analysis(small_llama, small_gemma, config, tmp_path / "run3")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--alphas", "0,1"], "finite number > 0"),
        (["--emotions", "joy"], "non-empty subset"),
        (["--sweep-methods", "self,bogus"], "sweep_methods"),
        (["--layers", "3-x"], "cannot read layer spec"),
        (["--layers", ";"], "--layers is empty"),
        (["--lens-layers", "a"], "cannot read layer spec"),
        (["--n-per-emotion", "1"], "n_per_emotion"),
        (["--map", "nowhere/map"], "nowhere/map.safetensors"),
        (["--layer-match", "cosine"], "invalid choice: 'cosine'"),
        (["--map", "m", "--layer-match", "cka"], "map_path loads a map with its own pairs"),
    ],
)
def test_cli_refuses_bad_arguments_before_loading(args, message, tmp_path, capsys):
    # the model paths do not exist: an argument error must come before any loading
    try:
        code = main(
            ["analyze", "--source", str(tmp_path / "nope/"), "--target", str(tmp_path / "nope/")]
            + ["--out", str(tmp_path / "out"), *args]
        )
    except SystemExit as e:  # a choice argparse refuses itself, in the same one-line form
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("contrans analyze: ") and message in err
    assert not (tmp_path / "out").exists()


def test_cli_checks_layers_against_the_loaded_target(folders, tmp_path, capsys):
    src, tgt = folders
    for args in (["--lens-layers", "1,9"], ["--layers", "all;0-7"], ["--pca-layer", "5"]):
        code = main(["analyze", "--source", src, "--target", tgt, "--out", str(tmp_path), *args])
        assert code == 2
        err = capsys.readouterr().err
        assert "out of range" in err and "has 5 layers" in err
    assert not any(tmp_path.iterdir())


def test_cli_rejects_malformed_numbers(capsys):
    with pytest.raises(SystemExit) as e:
        main(["analyze", "--source", "a", "--target", "b", "--out", "c", "--alphas", "x"])
    assert e.value.code == 2
    assert "expected numbers like" in capsys.readouterr().err


def test_default_lens_layers():
    assert default_lens_layers(18) == [8, 14]
    assert default_lens_layers(1) == [0]


@pytest.mark.parametrize("metric", ["cka", "r2"])
def test_layer_match_fits_the_map_on_the_similarity_matching(
    metric, small_llama, small_gemma, tmp_path
):
    # a budget below the full 3 x 5 matrix's moments thins the layers, so only some target
    # layers get a map and the default lens layers must move onto mapped ones
    s_layers, t_layers = similarity_layers(3, 5, 48, 40, 0.0002)
    assert len(t_layers) < 5
    config = AnalysisConfig(
        layer_match=metric,
        similarity_max_gb=0.0002,
        sweep_methods=["transplanted"],
        **{**SMALL, "alphas": [1.0]},
    )
    res = run_analysis(small_llama, small_gemma, config, tmp_path, verbose=False)
    art = tmp_path / "artifacts"
    rmap = ResidualMap.load(art / "residual_map")
    matrix = "layer_similarity" if metric == "cka" else "layer_similarity_r2"
    sim = LayerSimilarity.load(art / matrix)
    assert sim.metric == metric
    assert list(sim.target_layers) == t_layers and list(sim.source_layers) == s_layers
    # the map reads from the matching the similarity suggests, not from relative depth
    assert [tuple(p) for p in rmap.layer_pairs] == [tuple(p) for p in sim.best_pairs()]
    assert [tl for _, tl in rmap.layer_pairs] == t_layers
    assert res["map"]["layer_match"] == metric and res["settings"]["layer_match"] == metric
    mapped = {tl for _, tl in rmap.layer_pairs}
    tables = sorted(tmp_path.glob("token_shifts_L*.json"))
    assert tables  # the lens layers moved onto mapped layers instead of failing
    assert {int(p.stem.split("_L")[1]) for p in tables} <= mapped
    if metric == "r2":
        assert _png_ok(tmp_path / "layer_similarity_r2.png")
        assert LayerSimilarity.load(art / "layer_similarity").metric == "cka"
    summary = (tmp_path / "summary.md").read_text()
    assert {"cka": "CKA matching", "r2": "R² matching"}[metric] in summary
