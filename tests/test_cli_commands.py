"""The ``contrans`` command: options made from the configs (each declared once), a help
that loads no torch, and the method's steps end to end on tiny models."""

import argparse
import dataclasses
import json
import subprocess
import sys
import time

import pytest
import torch

import contrans_tl.models
from contrans_tl.cli import COMMANDS, build_parser, main
from contrans_tl.cli_options import config_options, option_flag
from contrans_tl.concepts import ConceptVector, mean_difference
from contrans_tl.maps import ResidualMap
from contrans_tl.pipelines import configs

# The configs each command's settings come from; every other option is an input/output
# or a common option (--device, --dtype, --quiet), listed here once.
CONFIGS = {
    "refine": [configs.RefineConfig],
    "fit-map": [configs.MapConfig],
    "transplant": [configs.TransplantConfig],
    "generate": [configs.SteerConfig, configs.GenerateConfig],
    "evaluate": [configs.SteerConfig, configs.EvaluateConfig],
    "emotion": [configs.EmotionConfig],
    "analyze": [configs.AnalysisConfig],
    "dapa": [configs.DapaConfig],
    "recontrol": [configs.ReControlConfig],
    "report": [],
    "fetch": [],
    "export-gguf": [],
}
IO = {
    "refine": {"model", "out", "emotion", "positive", "negative", "concept"},
    "fit-map": {"source", "target", "out", "texts"},
    "transplant": {"vector", "map", "out"},
    "generate": {"model", "prompt", "prompts", "vector"},
    "evaluate": {"task", "model", "out", "vector"},
    "emotion": {"source", "target", "out", "cache_dir", "no_cache"},
    "analyze": {"source", "target", "out"},
    "dapa": {"out", "until"},
    "recontrol": {"out", "work"},
    "report": {"paths", "no_write"},
    "fetch": {"names", "tokenizer_only"},
    "export-gguf": {"vector", "out", "alpha", "drop_layer_0"},
}
COMMON = {"device", "dtype", "quiet", "help"}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser, _ = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_command_is_listed():
    assert set(_subparsers()) == set(COMMANDS) == set(CONFIGS)


@pytest.mark.parametrize("command", list(CONFIGS))
def test_options_are_the_config_fields_declared_once(command):
    parser = _subparsers()[command]
    dests = [a.dest for a in parser._actions]
    flags = [s for a in parser._actions for s in a.option_strings]
    assert len(flags) == len(set(flags)), f"an option string is declared twice: {flags}"
    fields = [f.name for cls in CONFIGS[command] for f in config_options(cls)]
    assert len(fields) == len(set(fields)), f"two configs share a field name: {fields}"
    # one option per config field, under the field's own name
    for cls in CONFIGS[command]:
        for f in config_options(cls):
            (action,) = [a for a in parser._actions if a.dest == f.name]
            assert option_flag(f) in action.option_strings
            if f.metadata.get("help"):
                assert action.help, f.name
    # and nothing else but the inputs, outputs and common options
    extra = set(dests) - set(fields) - IO[command] - COMMON
    assert not extra, f"{command}: options not from a config: {extra}"
    assert IO[command] <= set(dests)


def test_parsed_options_make_the_config_and_omitted_ones_keep_its_defaults():
    from contrans_tl.cli_options import config_kwargs

    parser = _subparsers()["emotion"]
    args = parser.parse_args(
        ["--source", "a", "--target", "b", "--out", "o", "--alphas", "1,0.5", "--no-self"]
    )
    config = configs.EmotionConfig(**config_kwargs(args, configs.EmotionConfig))
    assert config.alphas == (0.5, 1.0) and config.include_self is False
    default = configs.EmotionConfig()
    same = {f.name for f in dataclasses.fields(config)} - {"alphas", "include_self"}
    assert all(getattr(config, k) == getattr(default, k) for k in same)


def test_help_and_version_load_no_torch_and_answer_fast():
    code = (
        "import sys, time, io, contextlib\n"
        "t = time.perf_counter()\n"
        "from contrans_tl.cli import main\n"
        "for argv in (['--help'], ['emotion', '--help'], ['evaluate', '--help'], ['--version']):\n"
        "    buf = io.StringIO()\n"
        "    try:\n"
        "        with contextlib.redirect_stdout(buf):\n"
        "            main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (argv, e.code)\n"
        "    assert buf.getvalue(), argv\n"
        "loaded = [m in sys.modules for m in ('torch', 'transformer_lens')]\n"
        "print(time.perf_counter() - t, *loaded)\n"
    )
    t = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    wall = time.perf_counter() - t
    assert out[1:] == ["False", "False"], out  # neither torch nor TransformerLens loaded
    # well under a second idle; generous here, as the suite may share the CPU
    assert wall < 10, wall


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("contrans_tl 0.")


def test_help_shows_defaults_choices_and_zoo_names(capsys):
    for argv, shown in (
        (
            ["emotion", "--help"],
            [
                "(default: 0.05,0.1,0.2,0.4,0.8)",
                "whitened_procrustes,reduced_rank,mlp,anchor}",
                "--no-self",
            ],
        ),
        (["fetch", "--help"], ["smollm2-135m-instruct", "gemma-3-270m"]),
        (["analyze", "--help"], ["'all;0-8;9-17'", "(default: all)"]),
    ):
        with pytest.raises(SystemExit):
            main(argv)
        text = capsys.readouterr().out
        for s in shown:
            assert s in text, (argv, s)
        assert "``" not in text  # no raw reST


@pytest.fixture
def tiny_models(monkeypatch, small_llama, small_gemma):
    models = {"src": small_llama, "tgt": small_gemma}
    monkeypatch.setattr(contrans_tl.models, "resolve_model_name", lambda name: name)
    monkeypatch.setattr(contrans_tl.models, "load_model", lambda name, **kw: models[name])
    return models


POS = ["I am so happy today .", "What a joy this is .", "We laughed all day ."]
NEG = ["The bus was late .", "It rained on the road .", "A box sat there ."]


def test_refine_fit_map_transplant_generate_evaluate(tmp_path, tiny_models, capsys):
    (tmp_path / "pos.txt").write_text("\n".join(POS) + "\n\n")
    (tmp_path / "neg.json").write_text(json.dumps(NEG))
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"Sentence number {i} is here ." for i in range(40)))
    vec, rmap, moved = tmp_path / "v", tmp_path / "m", tmp_path / "moved"
    run = [
        ["refine", "--model", "src", "--positive", str(tmp_path / "pos.txt")],
        ["--negative", str(tmp_path / "neg.json"), "--out", str(vec), "--layers", "0,2", "-q"],
    ]
    assert main(run[0] + run[1]) == 0
    v = ConceptVector.load(vec)
    want = mean_difference(tiny_models["src"], POS, NEG, layers=[0, 2], concept="v")
    assert v.layers == (0, 2) and v.concept == "v"
    torch.testing.assert_close(v.vectors, want.vectors)
    argv = ["fit-map", "--source", "src", "--target", "tgt", "--texts", str(texts)]
    assert main(argv + ["--out", str(rmap), "--pairing", "last", "-q"]) == 0
    m = ResidualMap.load(rmap)
    assert m.pairing == "last" and m.info["command"].startswith("python -m contrans_tl fit-map")
    assert main(["transplant", "--vector", str(vec), "--map", str(rmap), "--out", str(moved)]) == 0
    out = ConceptVector.load(moved)
    torch.testing.assert_close(out.vectors, m.transplant(v).vectors)
    capsys.readouterr()
    gen = ["generate", "--model", "tgt", "--prompt", "The cat", "--max-new-tokens", "3"]
    assert main(gen + ["--vector", str(moved), "--alpha", "2", "-q"]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert line["prompt"] == "The cat" and "v x2" in line
    res = tmp_path / "ppl.json"
    ev = ["evaluate", "perplexity", "--model", "tgt", "--vector", str(moved), "--alpha", "2"]
    assert main(ev + ["--n-items", "4", "--out", str(res), "-q"]) == 0
    data = json.loads(res.read_text())
    assert set(data["results"]) == {"base", "v x2"}
    assert data["intervention"]["alphas"] == [2.0] and data["results"]["base"]["n"] == 4
    from contrans_tl.evals.perplexity import heldout_wikisplit, perplexity

    base = perplexity(tiny_models["tgt"], heldout_wikisplit(4), max_length=128)["ppl"]
    assert data["results"]["base"]["ppl"] == pytest.approx(base, rel=1e-6)
    assert main(["report", str(res)]) == 0
    assert "| base |" in (tmp_path / "ppl.md").read_text()


@pytest.mark.parametrize(
    ("argv", "shown"),
    [
        (["refine", "--model", "src", "--out", "x"], "--emotion NAME, or --positive"),
        (["refine", "--model", "src", "--out", "x", "--emotion", "joy"], "--emotion must be"),
        (["refine", "--model", "src", "--out", "x/", "--emotion", "fear"], "artifact's NAME"),
        (
            ["refine", "--model", "src", "--out", "x", "--positive", "nofile", "--negative", "n"],
            "cannot read",
        ),
        (
            ["fit-map", "--source", "src", "--target", "tgt", "--out", "m", "--n-texts", "3"],
            "n_texts",
        ),
        (["fit-map", "--source", "src", "--target", "tgt", "--out", "m", "--ridge", "-1"], "ridge"),
        (["transplant", "--vector", "nope", "--map", "nope", "--out", "o"], "--vector 'nope'"),
        (["generate", "--model", "src"], "--prompt TEXT"),
        (["generate", "--model", "src", "--prompt", "a", "--layers", "x"], "--layers"),
        (["evaluate", "emotion", "--model", "src"], "give --emotion"),
        (["evaluate", "perplexity", "--model", "src", "--out", "r.txt"], ".json file"),
        (["evaluate", "truthfulqa", "--model", "src", "--n-items", "0"], "n_items"),
        (["evaluate", "toxigen", "--model", "src", "--device", "cuda:7"], "--device"),
        (["report", "no/such/run"], "does not exist"),
        (["dapa", "--out", "d", "--n-test", "500"], "n_test must be <= 192"),
        (["dapa", "--out", "d", "--ddmin-tolerance", "1"], "ddmin_tolerance"),
        (["recontrol", "--out", "r", "--steps", "0"], "steps"),
        (["recontrol", "--out", "r", "--best-of-n", "0"], "best_of_n"),
    ],
)
def test_bad_input_is_one_line_before_loading(argv, shown, tmp_path, capsys, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("model loaded")

    monkeypatch.setattr(contrans_tl.models, "load_model", refuse)
    monkeypatch.setattr(contrans_tl.models, "resolve_model_name", lambda name: name)
    monkeypatch.chdir(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith(f"contrans {argv[0]}: "), err
    assert shown in err, err
    assert not any(tmp_path.iterdir())


def test_config_vocabularies_match_the_library():
    """configs.py spells the library's choices out (it imports no torch); they must agree."""
    from typing import get_args

    from contrans_tl import activations, maps, steering

    assert set(configs.PAIRINGS) == set(maps.PAIRINGS) == set(get_args(maps.Pairing))
    assert set(configs.MAP_METHODS) == set(get_args(maps.MapMethod))
    assert set(configs.FULL_RANK_MAP_METHODS) == set(configs.MAP_METHODS) - {"reduced_rank"}
    from contrans_tl import map_texts

    assert set(configs.MAP_TEXT_KINDS) == set(map_texts.MAP_TEXTS)
    from contrans_tl import state_maps

    assert set(configs.STATE_MAP_FAMILIES) == set(state_maps.FAMILIES)
    assert set(configs.EMOTION_MAP_METHODS) == set(configs.MAP_METHODS) | set(state_maps.FAMILIES)
    assert set(configs.STEER_POSITIONS) == set(get_args(steering.StepPositions))
    assert set(configs.STEER_SCALES) == set(get_args(steering.Scale))
    assert set(configs.READ_POSITIONS) == set(get_args(activations.Positions))
