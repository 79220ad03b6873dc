"""Bad model files and devices are refused up front, by name (issue 13, unclear errors).

No real model is loaded: GGUF files are a few hundred kilobytes written here, and the device
tests replace :func:`contrans_tl.models.load_hf_model` by a function that fails the test if
it is called, which proves the device was refused before anything was loaded.
"""

import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from contrans_tl import models
from contrans_tl.models import load_hf_model, load_model, load_tokenizer

LOADERS = {
    "load_model": lambda p: load_model(str(p)),
    "load_hf_model": lambda p: load_hf_model(str(p)),
    "load_tokenizer": lambda p: load_tokenizer(str(p)),
}


def _tiny_gguf(path: Path) -> bytes:
    """A small valid GGUF file (a 1-block llama header and two tensors); returns its bytes."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([b"a", b"b", b"c"])
    w.add_token_merges([])
    w.add_tensor("token_embd.weight", np.zeros((3, 8), dtype=np.float32))
    w.add_tensor("output.weight", np.zeros((64, 1024), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def _never(*args, **kwargs):
    raise AssertionError("this should not have been reached: the input was bad")


@pytest.fixture
def no_reading(monkeypatch):
    """Fail if transformers is asked to read a file, or the file is hashed."""
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", _never)
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", _never)
    monkeypatch.setattr(models, "sha256_file", _never)


HEADER_CASES = {
    "empty": (b"", "is empty"),
    "three bytes": (b"GGU", "is truncated: 3 bytes"),
    "header cut": (b"GGUF" + struct.pack("<I", 3) + b"\0" * 8, "is truncated: 16 bytes"),
    "a zip file": (b"PK\x03\x04" + b"\0" * 60, r"is not a GGUF file: it starts with b'PK"),
    "text": (b"version https://git-lfs.github.com/spec/v1\n", "is not a GGUF file"),
    "bad version": (b"GGUF" + struct.pack("<I", 99) + b"\0" * 40, "GGUF version 99"),
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_bad_gguf_header_is_refused_before_reading(tmp_path, no_reading, loader, case):
    content, problem = HEADER_CASES[case]
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(path)) + " .*" + problem):
        LOADERS[loader](path)


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("keep", ["kv", "tensors"])
def test_truncated_gguf_body_is_named(tmp_path, loader, keep):
    data = _tiny_gguf(tmp_path / "full.gguf")
    path = tmp_path / "cut.gguf"
    # cut inside the metadata (struct.error in gguf) or inside the tensor data (numpy)
    path.write_bytes(data[:100] if keep == "kv" else data[:-1000])
    with pytest.raises(ValueError) as e:
        LOADERS[loader](path)
    msg = str(e.value)
    assert "cut.gguf" in msg and "ends early or is corrupt" in msg, msg
    assert f"({len(path.read_bytes())} bytes)" in msg


@pytest.fixture
def nothing_loads(monkeypatch):
    monkeypatch.setattr(models, "load_hf_model", _never)


@pytest.mark.parametrize("device", ["gpu", "GPU:0", "cuda:x", "", "meta", torch.device("meta")])
def test_unknown_device_is_refused_before_loading(nothing_loads, device):
    with pytest.raises(ValueError, match=r"device .* available here: \['cpu'"):
        load_model("smollm2-135m-instruct", device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only torch")
def test_cuda_on_cpu_only_torch_is_refused_before_loading(nothing_loads):
    with pytest.raises(ValueError, match=r"device 'cuda:0' asks for cuda.*sees no cuda device"):
        load_model("smollm2-135m-instruct", device="cuda:0")
    with pytest.raises(ValueError, match=r"available here: \['cpu'\]"):
        load_model("smollm2-135m-instruct", device=torch.device("cuda"))


def test_cuda_without_gpu_is_refused_anywhere(nothing_loads, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"'cuda:0' asks for cuda.*available here: \['cpu'"):
        load_model("smollm2-135m-instruct", device="cuda:0")


def test_cuda_index_beyond_the_devices_present_is_refused(nothing_loads, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"has 2 cuda device\(s\).*'cuda:0', 'cuda:1'\]"):
        load_model("smollm2-135m-instruct", device="cuda:2")
    # the devices that are there get through to the load (here: the refusing stand-in)
    for device in ("cpu", "cpu:0", torch.device("cpu"), "cuda", "cuda:1"):
        with pytest.raises(AssertionError, match="should not have been reached"):
            load_model("smollm2-135m-instruct", device=device)


def test_mps_without_mps_is_refused(nothing_loads, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"'mps' asks for Apple's MPS"):
        load_model("smollm2-135m-instruct", device="mps")
