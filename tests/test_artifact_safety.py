"""Artifacts survive killed saves, and edits of their JSON are refused (issue 13, causes 1, 3).

The kill test runs a saving process (forked from ``_artifact_kill_helper.py``, a fork server
that imports the package once), SIGKILLs it at random times and, by injection, at every step
of a save, and checks after every kill that the artifact loads as the old or the new one.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from _artifact_kill_helper import meta_for, tensors_for
from safetensors.torch import save_file

from contrans_tl import io
from contrans_tl.concepts import ConceptVector
from contrans_tl.io import FORMAT_VERSION, artifact_paths, load_artifact, save_artifact
from contrans_tl.maps import ResidualMap
from contrans_tl.provenance import ModelProvenance

HELPER = Path(__file__).with_name("_artifact_kill_helper.py")
STEPS = ("tensors_written", "pending_written", "tensors_replaced", "json_replaced")
N_RANDOM_KILLS = 36
KILLS_PER_STEP = 3


def _temp_files(folder: Path, name: str) -> list[str]:
    """Files in ``folder`` that belong to artifact ``name`` but are not its two files."""
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.name.startswith(f".{name}.") and p.name not in (f"{name}.json", f"{name}.safetensors")
    )


class _ForkServer:
    """Client of ``_artifact_kill_helper.py``: forks saving children on request."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HELPER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.ask(None) == {"ready": True}

    def ask(self, cmd: dict | None) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if cmd is not None:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the fork server died (exit code {self.proc.poll()})"
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _log_counters(log: Path) -> tuple[list[int], list[int]]:
    started, done = [], []
    for line in log.read_text().splitlines() if log.exists() else []:
        word, k = line.split()
        (started if word == "start" else done).append(int(k))
    return started, done


def _assert_is_save(folder: Path, name: str, k: int) -> None:
    tensors, meta = load_artifact(folder / name, kind="kill_test")
    assert meta["counter"] == k
    assert {key: meta[key] for key in meta_for(k)} == meta_for(k)
    expected = tensors_for(k)
    assert tensors.keys() == expected.keys()
    for key in expected:
        assert torch.equal(tensors[key], expected[key]), f"tensor {key} of save {k} differs"


def test_killed_saves_always_leave_the_old_or_the_new_artifact(tmp_path, record_property):
    folder, name, log = tmp_path / "art", "thing", tmp_path / "saves.log"
    folder.mkdir()
    t0 = time.perf_counter()
    save_artifact(folder / name, tensors_for(0), meta_for(0))
    save_seconds = time.perf_counter() - t0
    committed, counter = 0, 0
    stats: Counter[str] = Counter()
    rng = random.Random(13)
    plan = [None] * N_RANDOM_KILLS + [s for s in STEPS for _ in range(KILLS_PER_STEP)]
    rng.shuffle(plan)
    server = _ForkServer()
    try:
        for step in plan:
            base = counter + 1
            log.unlink(missing_ok=True)
            cmd = {"folder": str(folder), "name": name, "base": base, "log": str(log)}
            if step is None:
                pid = server.ask({**cmd, "op": "loop"})["pid"]
                # a few saves' worth of time: kills land at every point of a save
                time.sleep(rng.uniform(0.0, 4 * max(save_seconds, 0.01)))
                os.kill(pid, signal.SIGKILL)
            else:
                pid = server.ask({**cmd, "op": "once", "step": step})["pid"]
            status = server.ask({"op": "wait", "pid": pid})
            assert status["signal"] == signal.SIGKILL, f"saver not killed at {step}: {status}"
            stats["kills"] += 1
            started, done = _log_counters(log)
            if done:
                committed = done[-1]
            in_flight = started[-1] if started and started[-1] not in done else None
            counter = max([counter, *started])
            stats["kills_mid_save"] += in_flight is not None
            stats["temp_files_after_kill"] += len(_temp_files(folder, name))

            try:
                _, meta = load_artifact(folder / name, kind="kill_test")
            except Exception as e:  # noqa: BLE001 - any error here is a lost artifact
                stats["lost"] += 1
                pytest.fail(f"kill {stats['kills']} (step {step}) lost the artifact: {e}")
            got = meta["counter"]
            assert got in (committed, in_flight), (
                f"loaded save {got}, expected the old {committed} or the new {in_flight}"
            )
            if step is not None:  # injected: the step decides which one it must be
                assert got == (committed if step in STEPS[:2] else in_flight), step
            _assert_is_save(folder, name, got)
            stats["loaded_new" if got == in_flight else "loaded_old"] += 1

            counter += 1  # a successful save afterwards leaves no temp files behind
            save_artifact(folder / name, tensors_for(counter), meta_for(counter))
            committed = counter
            left = _temp_files(folder, name)
            stats["stale_files_left"] += len(left)
            assert left == [], f"after kill {stats['kills']} and a save: {left}"
            _assert_is_save(folder, name, counter)
    finally:
        server.close()
        for key in ("kills", "kills_mid_save", "loaded_old", "loaded_new", "lost"):
            record_property(key, stats[key])
        record_property("temp_files_after_kill", stats["temp_files_after_kill"])
        record_property("stale_files_left", stats["stale_files_left"])
    assert stats["kills"] == N_RANDOM_KILLS + len(STEPS) * KILLS_PER_STEP
    assert stats["lost"] == 0 and stats["stale_files_left"] == 0
    assert stats["loaded_new"] >= KILLS_PER_STEP * 2  # the injected late kills at least


def test_loads_during_saves_always_see_a_whole_artifact(tmp_path):
    """A loader never sees the tensors of one save with the JSON of another."""
    save_artifact(tmp_path / "a", tensors_for(0), meta_for(0))
    errors: list[BaseException] = []
    loads = Counter()
    stop = threading.Event()

    def load_loop() -> None:
        while not stop.is_set():
            try:
                tensors, meta = load_artifact(tmp_path / "a", kind="kill_test")
                assert torch.equal(tensors["b"], tensors_for(meta["counter"])["b"])
                loads[meta["counter"]] += 1
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                return

    thread = threading.Thread(target=load_loop)
    thread.start()
    try:
        for k in range(1, 16):
            save_artifact(tmp_path / "a", tensors_for(k), meta_for(k))
    finally:
        stop.set()
        thread.join()
    assert errors == [] and sum(loads.values()) > 0
    assert _temp_files(tmp_path, "a") == []


class _SimulatedKill(BaseException):
    pass


def _die_at(step_name):
    def hook(name: str) -> None:
        if name == step_name:
            raise _SimulatedKill(name)

    return hook


def test_interrupted_save_loads_from_a_read_only_folder(tmp_path, monkeypatch):
    save_artifact(tmp_path / "a", tensors_for(0), meta_for(0))
    monkeypatch.setattr(io, "_save_hook", _die_at("tensors_replaced"))
    with pytest.raises(_SimulatedKill):
        save_artifact(tmp_path / "a", tensors_for(1), meta_for(1))
    monkeypatch.setattr(io, "_save_hook", None)
    assert len(_temp_files(tmp_path, "a")) == 1  # the pending JSON of save 1

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    with monkeypatch.context() as m:
        m.setattr(os, "replace", read_only)
        _assert_is_save(tmp_path, "a", 1)  # loads, though it cannot finish the save
    assert len(_temp_files(tmp_path, "a")) == 1
    _assert_is_save(tmp_path, "a", 1)  # now it can: the pending JSON becomes a.json
    assert _temp_files(tmp_path, "a") == []
    assert json.loads((tmp_path / "a.json").read_text())["counter"] == 1

    # a stray pending JSON of other tensors does not make a mismatched pair load
    save_artifact(tmp_path / "b", tensors_for(2), meta_for(2))
    (tmp_path / ".a.0123456789abcdef.pending.json").write_text((tmp_path / "b.json").read_text())
    (tmp_path / "a.json").write_text((tmp_path / "b.json").read_text())
    with pytest.raises(ValueError, match="does not match its JSON"):
        load_artifact(tmp_path / "a")


def test_first_save_killed_between_renames_loads_the_new_artifact(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "_save_hook", _die_at("tensors_replaced"))
    with pytest.raises(_SimulatedKill):
        save_artifact(tmp_path / "a", tensors_for(3), meta_for(3))
    monkeypatch.setattr(io, "_save_hook", None)
    assert not (tmp_path / "a.json").exists()
    _assert_is_save(tmp_path, "a", 3)


def test_save_rolls_an_interrupted_save_forward_before_cleaning(tmp_path, monkeypatch):
    """The next save finishes the killed one first, so a kill of *it* loses nothing either."""
    save_artifact(tmp_path / "a", tensors_for(0), meta_for(0))
    monkeypatch.setattr(io, "_save_hook", _die_at("tensors_replaced"))
    with pytest.raises(_SimulatedKill):
        save_artifact(tmp_path / "a", tensors_for(1), meta_for(1))
    monkeypatch.setattr(io, "_save_hook", _die_at("tensors_written"))
    with pytest.raises(_SimulatedKill):
        save_artifact(tmp_path / "a", tensors_for(2), meta_for(2))
    monkeypatch.setattr(io, "_save_hook", None)
    _assert_is_save(tmp_path, "a", 1)


def test_stale_temp_files_are_deleted_but_not_those_of_other_names(tmp_path):
    save_artifact(tmp_path / "a", tensors_for(0), meta_for(0))
    stale = [
        ".a.0123456789abcdef.safetensors.tmp",
        ".a.fedcba9876543210.pending.json",
        ".a.safetensors.k2j4_x9q.tmp",  # left by a killed version-1 save
        ".a.json.k2j4_x9q.tmp",
    ]
    others = [".a.b.0123456789abcdef.pending.json", ".ab.safetensors.k2j4_x9q.tmp", "a.txt"]
    for n in stale + others:
        (tmp_path / n).write_text("{}")
    save_artifact(tmp_path / "a", tensors_for(1), meta_for(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["a.json", "a.safetensors", *others]
    )
    _assert_is_save(tmp_path, "a", 1)


# --------------------------------------------------------------------------------------------
# The JSON is covered by the integrity check
# --------------------------------------------------------------------------------------------

MODEL = {
    "model_id": "tiny-src",
    "d_model": 8,
    "n_layers": 3,
    "weight_processing": "none",
    "source": "object",
    "revision": None,
    "file_sha256": None,
    "dtype": "float32",
    "architecture": "LlamaForCausalLM",
    "d_vocab": 300,
}
TARGET = {
    "model_id": "tiny-tgt",
    "d_model": 6,
    "n_layers": 4,
    "weight_processing": "none",
    "source": "object",
    "revision": None,
    "file_sha256": None,
    "dtype": "float32",
    "architecture": "LlamaForCausalLM",
    "d_vocab": 300,
}


def _vector() -> ConceptVector:
    g = torch.Generator().manual_seed(0)
    return ConceptVector(
        vectors=torch.randn(2, 8, generator=g),
        layers=(0, 2),
        model=ModelProvenance.from_dict(MODEL),
        concept="joy",
        metadata={"note": "x", "nan_score": float("nan")},
    )


def _map() -> ResidualMap:
    g = torch.Generator().manual_seed(1)
    pairs = [(0, 1), (2, 3)]
    return ResidualMap(
        layer_pairs=pairs,
        weights={t: torch.randn(8, 6, generator=g) for _, t in pairs},
        biases={t: torch.zeros(6) for _, t in pairs},
        source=ModelProvenance.from_dict(MODEL),
        target=ModelProvenance.from_dict(TARGET),
        method="svd",
        pairing="last",
        metrics={1: {"r2": 0.5, "cosine": float("nan")}, 3: {"r2": 0.25, "cosine": 0.9}},
    )


def _edit(path: Path, change) -> None:
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta, indent=2))


def test_untouched_round_trips_still_load(tmp_path):
    v, m = _vector(), _map()
    v.save(tmp_path / "v")
    m.save(tmp_path / "m")
    back = ConceptVector.load(tmp_path / "v")
    assert torch.equal(back.vectors, v.vectors) and back.layers == (0, 2)
    mb = ResidualMap.load(tmp_path / "m")
    assert mb.layer_pairs == m.layer_pairs and torch.equal(mb.weights[3], m.weights[3])
    assert json.loads((tmp_path / "v.json").read_text())["format_version"] == FORMAT_VERSION == 2
    # a re-indented JSON with the same content is not an edit
    (tmp_path / "v.json").write_text(json.dumps(json.loads((tmp_path / "v.json").read_text())))
    assert ConceptVector.load(tmp_path / "v").concept == "joy"


@pytest.mark.parametrize(
    ("field", "change", "shown"),
    [
        ("'layers'", lambda m: m.update(layers=[0, 1]), r"\[0, 1\] in the JSON but \[0, 2\]"),
        (
            "'model.model_id'",
            lambda m: m["model"].update(model_id="someone-else"),
            '"someone-else" in the JSON but "tiny-src"',
        ),
        ("'concept'", lambda m: m.update(concept="fear"), '"fear" in the JSON but "joy"'),
        ("'model.d_model'", lambda m: m["model"].pop("d_model"), "missing from the JSON"),
        ("'extra'", lambda m: m.update(extra=1), "1 in the JSON but absent from"),
        ("'format_version'", lambda m: m.update(format_version=1), "1 in the JSON but 2"),
    ],
)
def test_edited_vector_json_is_refused_naming_the_field(tmp_path, field, change, shown):
    _vector().save(tmp_path / "v")
    _edit(tmp_path / "v.json", change)
    with pytest.raises(ValueError) as e:
        ConceptVector.load(tmp_path / "v")
    msg = str(e.value)
    assert "v.json was edited after it was saved" in msg and "v.safetensors" in msg
    assert f"{field} is" in msg and re.search(shown, msg), msg
    assert "re-save the artifact" in msg


def test_edited_map_layer_pairs_are_refused(tmp_path):
    _map().save(tmp_path / "m")
    _edit(tmp_path / "m.json", lambda m: m.update(layer_pairs=[[1, 1], [2, 3]]))
    with pytest.raises(ValueError, match=r"'layer_pairs' is \[\[1, 1\], \[2, 3\]\] in the JSON"):
        ResidualMap.load(tmp_path / "m")


def test_edited_map_metric_is_refused(tmp_path):
    _map().save(tmp_path / "m")
    _edit(tmp_path / "m.json", lambda m: m["metrics"]["3"].update(r2=0.99))
    with pytest.raises(ValueError, match=r"'metrics.3.r2' is 0.99 in the JSON but 0.25"):
        ResidualMap.load(tmp_path / "m")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("truncated", "is not valid JSON"),
        ("", "is empty"),
        ("[1, 2]", "holds a JSON list, expected an object"),
        ('"text"', "holds a JSON str, expected an object"),
    ],
)
def test_broken_json_sidecar_is_named(tmp_path, content, problem):
    _vector().save(tmp_path / "v")
    js = tmp_path / "v.json"
    if content == "truncated":
        content = js.read_text()[: len(js.read_text()) // 2]
    js.write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(js)) + ".*" + problem):
        ConceptVector.load(tmp_path / "v")


@pytest.mark.parametrize("keep", [0, 5, 60, -4])
def test_truncated_tensor_file_is_named_corrupt(tmp_path, keep):
    _vector().save(tmp_path / "v")
    st = tmp_path / "v.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[:keep])
    with pytest.raises(ValueError, match=re.escape(str(st)) + " is corrupt or truncated"):
        ConceptVector.load(tmp_path / "v")


def _write_version_1(path: Path, tensors: dict, meta: dict) -> None:
    """An artifact as version-1 contrans_tl wrote it: no metadata copy in the header."""
    st, js = artifact_paths(path)
    save_file(tensors, str(st), metadata={"kind": meta["kind"]})
    full = {"format_version": 1, **meta, "tensors_sha256": io.sha256_file(st)}
    js.write_text(json.dumps(full, indent=2))


def _v1_vector_meta() -> dict:
    v = _vector()
    return {
        "kind": "concept_vector",
        "concept": v.concept,
        "method": v.method,
        "layers": list(v.layers),
        "hook_template": v.hook_template,
        "model": v.model.to_dict(),
        "metadata": {"note": "x"},
    }


def test_version_1_artifact_loads_with_a_warning(tmp_path):
    v = _vector()
    _write_version_1(tmp_path / "v", {"vectors": v.vectors}, _v1_vector_meta())
    with pytest.warns(UserWarning, match="version-1 artifact.*not its JSON"):
        back = ConceptVector.load(tmp_path / "v")
    assert torch.equal(back.vectors, v.vectors) and back.layers == (0, 2)
    back.save(tmp_path / "v")  # re-saving upgrades it
    assert json.loads((tmp_path / "v.json").read_text())["format_version"] == 2


def test_version_1_artifact_is_cross_checked(tmp_path):
    v = _vector()
    bad_layers = {**_v1_vector_meta(), "layers": [0, 1, 2]}
    _write_version_1(tmp_path / "v", {"vectors": v.vectors}, bad_layers)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="'layers' has 3 entries"):
        ConceptVector.load(tmp_path / "v")
    m = _map()
    tensors = {f"{w}.{t}": torch.zeros(8, 6) for t in (1, 3) for w in ("weight", "bias")}
    meta = {"kind": "residual_map", "layer_pairs": [[0, 1], [2, 6]], "source": m.source.to_dict()}
    _write_version_1(tmp_path / "m", tensors, meta)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="'layer_pairs'.*bias.6"):
        load_artifact(tmp_path / "m", kind="residual_map")
    _write_version_1(tmp_path / "k", {"x": torch.zeros(1)}, {"kind": "x"})
    _edit(tmp_path / "k.json", lambda meta: meta.update(kind="y"))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="saved as a 'x'"):
        load_artifact(tmp_path / "k")


def test_version_2_json_without_header_copy_is_refused(tmp_path):
    _write_version_1(tmp_path / "v", {"vectors": _vector().vectors}, _v1_vector_meta())
    _edit(tmp_path / "v.json", lambda meta: meta.update(format_version=2))
    with pytest.raises(ValueError, match="holds no copy of the metadata"):
        ConceptVector.load(tmp_path / "v")
