"""llama.cpp control vectors: the file llama.cpp and repeng read, layer numbering, refusals."""

import json
import os
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import tiny_llama, tiny_llama_hf

from contrans_tl.cli import main as cli_main
from contrans_tl.concepts import ConceptVector
from contrans_tl.gguf_vectors import model_hint, read_control_vector, write_control_vector
from contrans_tl.provenance import model_provenance
from contrans_tl.steering import steer

REPO = Path(__file__).resolve().parents[1]
PEERS_PYTHON = (
    Path(os.environ.get("PEERS_VENV", REPO / "benchmarks" / "peers" / ".venv-peers"))
    / "bin"
    / "python"
)


def _vector(model, layers, seed=0, concept="joy"):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(len(layers), model.cfg.d_model, generator=g)
    return ConceptVector(rows, tuple(layers), model_provenance(model), concept)


def _raw_gguf(path, tensors, arch="controlvector"):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_string(f"{arch}.model_hint", "llama")
    for name, value in tensors.items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_file_is_what_llama_cpp_reads(small_gemma, tmp_path):
    v = _vector(small_gemma, [1, 2, 4])
    path = v.to_gguf(tmp_path / "joy.gguf", alpha=2.5)
    reader = gguf.GGUFReader(path)
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "gemma3"
    assert reader.get_field("controlvector.layer_count").contents() == 3
    assert [t.name for t in reader.tensors] == ["direction.1", "direction.2", "direction.4"]
    for t, k in zip(reader.tensors, [1, 2, 4]):
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [40]
        np.testing.assert_allclose(np.array(t.data), 2.5 * v[k].numpy(), rtol=1e-6)
    back = ConceptVector.from_gguf(path, small_gemma)
    assert back.layers == (1, 2, 4) and back.concept == "joy"
    torch.testing.assert_close(back.vectors, 2.5 * v.vectors)
    assert back.metadata["gguf"]["alpha"] == 2.5
    assert back.metadata["gguf"]["made_for"] == v.model.to_dict()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["joy.gguf"]  # no temporary left


def test_direction_n_is_added_to_hf_block_n_output(byte_tokenizer, tmp_path):
    """llama.cpp and repeng add direction.N to the output of model.layers[N]: steering the
    bridge with the file's vector equals that hook on a second copy of the same weights."""
    bridge = tiny_llama(byte_tokenizer, d_model=48, n_layers=3, seed=5, name="tiny-cv")
    hf = tiny_llama_hf(byte_tokenizer, d_model=48, n_layers=3, seed=5)
    v = _vector(bridge, [1, 2], seed=3)
    v = v.replace(vectors=v.vectors * 4)
    read = read_control_vector(v.to_gguf(tmp_path / "v.gguf"), bridge)
    ids = byte_tokenizer(["the cat sat on"], return_tensors="pt").input_ids

    def add(k):
        def hook(module, inputs, output):
            first = output[0] if isinstance(output, tuple) else output
            first = first + read[k]
            return (first, *output[1:]) if isinstance(output, tuple) else first

        return hook

    handles = [hf.model.layers[k].register_forward_hook(add(k)) for k in read.layers]
    try:
        with torch.no_grad():
            want = hf(ids).logits
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad(), steer(bridge, read, 1.0):
        got = bridge(ids)
        plain = hf(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (want - plain).abs().max() > 1e-2  # the vector does move the logits


def test_layer_0_refused_or_dropped(small_gemma, tmp_path):
    v = _vector(small_gemma, [0, 1, 3])
    with pytest.raises(ValueError, match=r"layer-0 row.*drop_layer_0=True.*\[1, 3\]"):
        v.to_gguf(tmp_path / "v.gguf")
    assert not (tmp_path / "v.gguf").exists()
    back = ConceptVector.from_gguf(v.to_gguf(tmp_path / "v.gguf", drop_layer_0=True), small_gemma)
    assert back.layers == (1, 3)
    with pytest.raises(ValueError, match="no layer above 0"):
        _vector(small_gemma, [0]).to_gguf(tmp_path / "w.gguf", drop_layer_0=True)
    with pytest.raises(ValueError, match="hook_resid_pre"):
        v.replace(hook_template="blocks.{layer}.hook_resid_pre").to_gguf(tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        write_control_vector(v, tmp_path / "y.gguf", alpha=float("inf"), drop_layer_0=True)


_ONES48 = np.ones(48, np.float32)
#: (what, tensors of a raw file, its architecture, the model fixture, the refusal)
_UNFIT = [
    ("deep", {"direction.1": _ONES48, "direction.4": _ONES48}, "controlvector", "small_llama",
     r"direction.4 is for block 4.*1..2 of this 3-block"),
    ("narrow", {"direction.1": _ONES48}, "controlvector", "wide_llama",
     "width 48, but the model's d_model is 80"),
    ("zero", {"direction.0": _ONES48}, "controlvector", "small_llama", "for block 0"),
    ("half", {"direction.1": np.ones(48, np.float16)}, "controlvector", "small_llama",
     "1-D float32.*F16"),
    ("model", {"token_embd.weight": _ONES48}, "llama", "small_llama",
     "architecture 'llama', not a control vector"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "tensors", "arch", "model_name", "match"), _UNFIT)
def test_import_refuses_raw_files_that_do_not_fit(
    what, tensors, arch, model_name, match, request, tmp_path
):
    path = tmp_path / f"{what}.gguf"
    _raw_gguf(path, tensors, arch=arch)
    with pytest.raises(ValueError, match=match):
        read_control_vector(path, request.getfixturevalue(model_name))


def test_import_refuses_other_models_junk_and_missing_files(small_gemma, small_llama, tmp_path):
    path = _vector(small_gemma, [1, 4]).to_gguf(tmp_path / "g.gguf")
    with pytest.raises(ValueError, match="width 40, but the model's d_model is 48"):
        read_control_vector(path, small_llama)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not gguf at all")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        read_control_vector(junk, small_llama)
    with pytest.raises(FileNotFoundError, match="no control vector file"):
        read_control_vector(tmp_path / "missing.gguf", small_llama)


def test_recorded_model_is_checked(small_gemma, meta_tokenizer, tmp_path):
    from conftest import tiny_gemma3

    twin = tiny_gemma3(meta_tokenizer, seed=9, name="another-gemma3-40")
    path = _vector(small_gemma, [1, 2]).to_gguf(tmp_path / "g.gguf")
    with pytest.raises(ValueError, match="model id 'tiny-gemma3-40' vs 'another-gemma3-40'"):
        read_control_vector(path, twin)
    assert read_control_vector(path, twin, strict=False).model.model_id == "another-gemma3-40"


def test_a_plain_file_is_named_after_itself(small_llama, tmp_path):
    path = tmp_path / "calm.gguf"
    _raw_gguf(path, {"direction.2": np.arange(48, dtype=np.float32)})
    v = read_control_vector(path, small_llama)
    assert (v.layers, v.concept, v.method) == ((2,), "calm", "gguf_control_vector")
    assert v.metadata["gguf"]["made_for"] is None and v.metadata["gguf"]["model_hint"] == "llama"
    np.testing.assert_allclose(v[2].numpy(), np.arange(48))


def test_model_hint():
    assert model_hint("Qwen2ForCausalLM") == "qwen2"
    assert model_hint("Gemma3ForConditionalGeneration") == "gemma3"


def test_cli_export_gguf(small_gemma, tmp_path, capsys):
    v = _vector(small_gemma, [0, 1, 2])
    v.save(tmp_path / "joy")
    out = tmp_path / "joy.gguf"
    argv = ["export-gguf", "--vector", str(tmp_path / "joy"), "--out", str(out)]
    assert cli_main(argv) == 2
    assert "drop_layer_0=True" in capsys.readouterr().err and not out.exists()
    assert cli_main([*argv, "--drop-layer-0", "--alpha", "-1.5"]) == 0
    assert "direction.1..direction.2 (2 layers)" in capsys.readouterr().out
    back = read_control_vector(out, small_gemma)
    torch.testing.assert_close(back.vectors, -1.5 * v.vectors[1:])
    assert cli_main([*argv[:-1], str(tmp_path / "joy.bin")]) == 2
    assert "give the .gguf file" in capsys.readouterr().err


@pytest.mark.skipif(not PEERS_PYTHON.is_file(), reason="peers venv: bash benchmarks/peers/setup.sh")
def test_repeng_reads_our_file_and_we_read_repengs(small_gemma, tmp_path):
    v = _vector(small_gemma, [1, 2, 4])
    ours = v.to_gguf(tmp_path / "ours.gguf", alpha=0.5)
    theirs = tmp_path / "theirs.gguf"
    script = f"""
import json, numpy as np
from repeng import ControlVector
cv = ControlVector.import_gguf({str(ours)!r})
print(json.dumps({{"hint": cv.model_type,
                  "directions": {{str(k): d.tolist() for k, d in cv.directions.items()}}}}))
ControlVector(model_type="gemma3", directions={{
    3: np.linspace(-1, 1, 40, dtype=np.float32), 1: np.ones(40, np.float32)}}
).export_gguf({str(theirs)!r})
"""
    done = subprocess.run(
        [str(PEERS_PYTHON), "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["hint"] == "gemma3"
    assert sorted(seen["directions"]) == ["1", "2", "4"]
    for k in (1, 2, 4):
        np.testing.assert_allclose(seen["directions"][str(k)], 0.5 * v[k].numpy(), rtol=1e-6)
    back = read_control_vector(theirs, small_gemma)
    assert back.layers == (1, 3)
    np.testing.assert_allclose(back[3].numpy(), np.linspace(-1, 1, 40), rtol=1e-6)
    np.testing.assert_allclose(back[1].numpy(), np.ones(40))
