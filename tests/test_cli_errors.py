"""User errors of the ``contrans`` command: refused before any model is loaded, with one
line ``contrans COMMAND: message`` on stderr, status 2, no traceback, nothing written."""

import os
import struct
from pathlib import Path

import pytest

import contrans_tl.models
from contrans_tl.cli import check_model_name, main
from contrans_tl.evals.emotion_run import (
    check_emotion_args,
    check_out_dir,
    run_emotion_experiment,
)

SOURCE, TARGET = "smollm2-135m-instruct", "gemma-3-270m"  # zoo names: pass the name check


@pytest.fixture
def no_load(monkeypatch):
    """Any model or tokenizer load fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("model loaded")

    monkeypatch.setattr(contrans_tl.models, "load_model", refuse)
    monkeypatch.setattr(contrans_tl.models, "load_tokenizer", refuse)


def _run(argv, capsys):
    """Exit status and stderr of ``main(argv)`` (argparse's errors raise SystemExit)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _assert_one_line(err, command, *names):
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"contrans {command}: "), err
    assert "Traceback" not in err
    for name in names:
        assert name in err, (name, err)


def _option_named(err, option):
    # messages of the shared checks use the parameter's name (batch_size), the CLI's own
    # use the option (--layers)
    return option in err or option.lstrip("-").replace("-", "_") in err


def _entries(path: Path) -> set[Path]:
    return set(path.rglob("*"))


BAD_EMOTION = [
    (["--alphas", "inf"], "--alphas", "inf"),
    (["--alphas", "nan"], "--alphas", "nan"),
    (["--alphas", "-inf"], "--alphas", "inf"),
    (["--alphas", "0.1,inf"], "--alphas", "inf"),
    (["--alphas", "-1,0.5"], "--alphas", "-1"),
    (["--alphas=-1,0.5"], "--alphas", "-1"),
    (["--alphas", "0,0.5"], "--alphas", "alpha 0 is always run"),
    (["--alphas", "abc"], "--alphas", "abc"),
    (["--alphas", ""], "--alphas", "empty"),
    (["--layers", "3-"], "--layers", "3-"),
    (["--layers", "x"], "--layers", "x"),
    (["--batch-size", "0"], "--batch-size", "0"),
    (["--batch-size", "-2"], "--batch-size", "-2"),
    (["--n-map-texts", "0"], "--n-map-texts", "0"),
    (["--n-map-texts", "5"], "--n-map-texts", "5"),
    (["--n-map-texts", "99999"], "--n-map-texts", "99999"),
    (["--n-refine", "0"], "--n-refine", "0"),
    (["--n-refine", "500"], "--n-refine", "500"),
    (["--n-fewshot", "0"], "--n-fewshot", "0"),
    (["--n-negatives", "0"], "--n-negatives", "0"),
    (["--n-negatives", "100000"], "--n-negatives", "100000"),
    (["--n-validation-negatives", "0"], "--n-validation-negatives", "0"),
    (["--pairings", "last,last"], "--pairings", "distinct"),
    (["--map-method", "bogus"], "--map-method", "bogus"),
]

BAD_ANALYZE = [
    (["--alphas", "inf"], "--alphas", "inf"),
    (["--alphas", "nan"], "--alphas", "nan"),
    (["--alphas", "-1,0.5"], "--alphas", "-1"),
    (["--alphas=-1,0.5"], "--alphas", "-1"),
    (["--alphas", "abc"], "--alphas", "abc"),
    (["--layers", "3-"], "--layers", "3-"),
    (["--layers", "x"], "--layers", "x"),
    (["--lens-layers", "x"], "--lens-layers", "x"),
]

# refused up front before this change already; kept so that they stay so
ALREADY_REFUSED = [
    ("emotion", ["--pairings", "bogus"], "--pairings", "bogus"),
    ("analyze", ["--alphas", ""], "--alphas", "empty"),
    ("analyze", ["--alpha", "inf"], "--alpha", "inf"),
    ("analyze", ["--batch-size", "0"], "--batch-size", "0"),
    ("analyze", ["--n-map-texts", "0"], "--n-map-texts", "0"),
    ("analyze", ["--n-map-texts", "5"], "--n-map-texts", "5"),
    ("analyze", ["--map-pairing", "bogus"], "--map-pairing", "bogus"),
    ("analyze", ["--map-method", "bogus"], "--map-method", "bogus"),
]


def _base(command, tmp_path):
    return [command, "--source", SOURCE, "--target", TARGET, "--out", str(tmp_path / "out")]


@pytest.mark.parametrize(
    ("command", "args", "option", "shown"),
    [("emotion", *case) for case in BAD_EMOTION] + [("analyze", *case) for case in BAD_ANALYZE],
)
def test_bad_setting_refused_before_loading(
    command, args, option, shown, tmp_path, capsys, no_load
):
    _check_refused(command, args, option, shown, tmp_path, capsys)


@pytest.mark.parametrize(("command", "args", "option", "shown"), ALREADY_REFUSED)
def test_bad_setting_still_refused_before_loading(
    command, args, option, shown, tmp_path, capsys, no_load
):
    _check_refused(command, args, option, shown, tmp_path, capsys)


def _check_refused(command, args, option, shown, tmp_path, capsys):
    before = _entries(tmp_path)
    code, err = _run(_base(command, tmp_path) + args, capsys)
    assert code == 2, err
    _assert_one_line(err, command, shown)
    assert _option_named(err, option), err
    assert _entries(tmp_path) == before


def _bad_outs(tmp_path):
    regular = tmp_path / "a_file"
    regular.write_text("x")
    return {
        "under_file": regular / "out",
        "nested_under_file": regular / "a" / "b",
        "file": regular,
    }


@pytest.mark.parametrize("command", ["emotion", "analyze"])
@pytest.mark.parametrize("which", ["under_file", "nested_under_file", "file"])
def test_unwritable_out_refused_before_loading(command, which, tmp_path, capsys, no_load):
    out = _bad_outs(tmp_path)[which]
    before = _entries(tmp_path)
    argv = [command, "--source", SOURCE, "--target", TARGET, "--out", str(out)]
    code, err = _run(argv, capsys)
    assert code == 2, err
    _assert_one_line(err, command, "--out", str(out))
    assert _entries(tmp_path) == before


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write a read-only folder"
)
@pytest.mark.parametrize("command", ["emotion", "analyze"])
def test_out_in_read_only_folder_refused(command, tmp_path, capsys, no_load):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        argv = [command, "--source", SOURCE, "--target", TARGET, "--out", str(ro / "out")]
        code, err = _run(argv, capsys)
        assert code == 2, err
        _assert_one_line(err, command, "--out", "cannot write")
        assert not any(ro.iterdir())
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("command", ["emotion", "analyze"])
@pytest.mark.parametrize(
    ("option", "name"),
    [
        ("--source", "not a model!"),
        ("--target", "not a model!"),
        ("--source", "./no/such/folder"),
        ("--target", "~/no/such/model.gguf"),
        ("--source", ""),
    ],
)
def test_bad_model_name_refused_before_loading(command, option, name, tmp_path, capsys, no_load):
    argv = _base(command, tmp_path)
    argv[argv.index(option) + 1] = name
    before = _entries(tmp_path)
    code, err = _run(argv, capsys)
    assert code == 2, err
    _assert_one_line(err, command, option, repr(name.strip()) if name.strip() else "empty")
    assert _entries(tmp_path) == before


def test_fetch_bad_name_refused_before_loading(capsys, no_load):
    code, err = _run(["fetch", "gemma-3-270m", "gemma 3"], capsys)
    assert code == 2, err
    _assert_one_line(err, "fetch", "'gemma 3'", "did you mean")


@pytest.mark.parametrize("command", ["emotion", "analyze"])
@pytest.mark.parametrize(
    "error",
    [ValueError("no such model on the hub"), OSError("could not load hub id 'a/b'\nsecond line")],
)
def test_load_model_refusal_is_one_line(command, error, tmp_path, capsys, monkeypatch):
    """A name that passes the up-front check but that load_model refuses (e.g. a hub id
    that does not exist) is still a user error."""

    def refuse(name, **kwargs):
        raise error

    monkeypatch.setattr(contrans_tl.models, "load_model", refuse)
    argv = _base(command, tmp_path)
    argv[argv.index("--target") + 1] = "no-such-owner/no-such-model"
    before = _entries(tmp_path)
    code, err = _run(argv, capsys)
    assert code == 2, err
    _assert_one_line(err, command, "--target", "no-such-owner/no-such-model", str(error)[:20])
    assert _entries(tmp_path) == before


@pytest.mark.parametrize("command", ["emotion", "analyze"])
def test_program_bug_in_load_still_tracebacks(command, tmp_path, capsys, monkeypatch):
    """Only user errors become one line; anything else propagates (as before this change)."""

    def broken(name, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(contrans_tl.models, "load_model", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(_base(command, tmp_path))


@pytest.fixture
def tiny_load(monkeypatch, small_llama, small_gemma):
    """load_model gives the tiny conftest models: SOURCE -> 3 layers, TARGET -> 5."""
    models = {SOURCE: small_llama, TARGET: small_gemma}
    monkeypatch.setattr(contrans_tl.models, "load_model", lambda name, **kw: models[name])


@pytest.mark.parametrize("layers", ["99", "0-7", "-9"])
def test_layers_out_of_range_after_loading(layers, tmp_path, capsys, tiny_load):
    _check_layers_refused("emotion", layers, tmp_path, capsys)


@pytest.mark.parametrize("layers", ["99", "0-7", "-9"])
def test_layers_out_of_range_after_loading_still_refused(layers, tmp_path, capsys, tiny_load):
    # analyze did this before this change already
    _check_layers_refused("analyze", layers, tmp_path, capsys)


def _check_layers_refused(command, layers, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("kept")  # an existing non-empty folder is a valid --out
    before = _entries(tmp_path)
    argv = [command, "--source", SOURCE, "--target", TARGET, "--out", str(out)]
    code, err = _run(argv + ["--layers", layers], capsys)
    assert code == 2, err
    _assert_one_line(err, command, "out of range", "has 5 layers", repr(TARGET))
    assert _entries(tmp_path) == before
    assert (out / "old.txt").read_text() == "kept"


def test_emotion_experiment_leaves_nothing_on_bad_input(tmp_path, small_llama, small_gemma):
    small = dict(n_map_texts=10, n_refine=2, n_fewshot=1, n_negatives=2, n_validation_negatives=2)
    for kwargs, match in (
        ({"alphas": [float("nan")]}, "finite"),
        ({"alphas": [-1.0, 0.5]}, "alpha 0 is always run"),
        ({"layers": [99]}, "out of range"),
    ):
        with pytest.raises(ValueError, match=match):
            run_emotion_experiment(small_llama, small_gemma, tmp_path / "out", **small, **kwargs)
    with pytest.raises(NotADirectoryError, match="is under"):
        (tmp_path / "f").write_text("")
        run_emotion_experiment(small_llama, small_gemma, tmp_path / "f" / "out", **small)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_check_out_dir_accepts_new_and_existing_folders(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert check_out_dir(tmp_path / "full") == tmp_path / "full"
    assert check_out_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]
    with pytest.raises(ValueError, match="empty"):
        check_out_dir("")


def test_check_emotion_args_returns_the_alphas_run():
    assert check_emotion_args(alphas=[0.4, 0.1, 0.4]) == [0.1, 0.4]
    with pytest.raises(ValueError, match="alpha 0 is always run as the unsteered 'base'"):
        check_emotion_args(alphas=[0.0, 0.5])


def test_check_model_name_accepts_what_load_model_takes(tmp_path):
    check_model_name(TARGET)
    check_model_name("HuggingFaceTB/SmolLM2-135M-Instruct")
    check_model_name(str(tmp_path))  # an existing folder
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 0)  # version 3, no tensors, no metadata
    (tmp_path / "m.gguf").write_bytes(header)
    check_model_name(str(tmp_path / "m.gguf"))
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.gguf.*empty"):
        check_model_name(str(tmp_path / "empty.gguf"))
    (tmp_path / "m.txt").write_text("")
    with pytest.raises(ValueError, match="not a .gguf file"):
        check_model_name(str(tmp_path / "m.txt"))
