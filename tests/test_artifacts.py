"""Saving and loading vectors and maps; refusing to use them on the wrong model."""

import dataclasses
import json

import pytest
import torch

from contrans_tl.concepts import ConceptVector, mean_difference
from contrans_tl.io import artifact_paths, load_artifact, save_artifact
from contrans_tl.maps import ResidualMap, fit_residual_map
from contrans_tl.steering import make_steering

TEXTS = [
    "The cat sat on the mat .",
    "A longer sentence about the history of the city , built in 1890 , follows here .",
    "Short one .",
    "Bob 's house was painted red in the spring of 1921 .",
]


@pytest.fixture(scope="module")
def vector(small_llama):
    return mean_difference(small_llama, TEXTS[:2], TEXTS[2:], concept="test", layers=[0, 2])


@pytest.fixture(scope="module")
def rmap(small_llama, small_gemma):
    return fit_residual_map(
        small_llama, small_gemma, TEXTS * 6, pairing="word_ends", heldout_fraction=0.25
    )


def test_vector_round_trip(vector, tmp_path):
    vector.save(tmp_path / "v")
    back = ConceptVector.load(tmp_path / "v.json")
    torch.testing.assert_close(back.vectors, vector.vectors, atol=0, rtol=0)
    assert back.layers == vector.layers and back.model == vector.model
    assert back.concept == "test" and back.metadata == json.loads(json.dumps(vector.metadata))
    meta = json.loads((tmp_path / "v.json").read_text())
    assert meta["kind"] == "concept_vector" and meta["model"]["d_model"] == 48


def test_map_round_trip_gives_same_transplant(rmap, vector, tmp_path):
    rmap.save(tmp_path / "m")
    back = ResidualMap.load(tmp_path / "m")
    assert back.layer_pairs == rmap.layer_pairs and back.pairing == "word_ends"
    assert back.metrics.keys() == rmap.metrics.keys()
    torch.testing.assert_close(
        back.transplant(vector).vectors, rmap.transplant(vector).vectors, atol=0, rtol=0
    )


def test_no_pickle_on_disk(vector, tmp_path):
    st, js = artifact_paths(tmp_path / "v")
    vector.save(tmp_path / "v")
    assert st.read_bytes()[8:9] == b"{"  # safetensors: 8-byte header length, then JSON
    json.loads(js.read_text())


def test_tampered_tensor_file_is_refused(vector, tmp_path):
    vector.save(tmp_path / "v")
    other = vector.replace(vectors=vector.vectors * 2)
    other.save(tmp_path / "w")
    (tmp_path / "v.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes())
    with pytest.raises(ValueError, match="does not match its JSON"):
        ConceptVector.load(tmp_path / "v")


def test_missing_half_and_wrong_kind(vector, rmap, tmp_path):
    vector.save(tmp_path / "v")
    (tmp_path / "v.json").unlink()
    with pytest.raises(FileNotFoundError, match="pair"):
        ConceptVector.load(tmp_path / "v")
    rmap.save(tmp_path / "m")
    with pytest.raises(ValueError, match="expected a 'concept_vector'"):
        ConceptVector.load(tmp_path / "m")


def test_failed_save_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        save_artifact(tmp_path / "bad", {"x": torch.zeros(2)}, {"kind": "x", "oops": object()})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError):
        load_artifact(tmp_path / "bad")


def test_vector_on_a_model_of_other_width_is_refused(vector, small_gemma):
    with pytest.raises(ValueError, match="d_model 48 vs the model's 40"):
        make_steering(small_gemma, vector, 1.0)


def test_vector_on_a_model_of_other_id_is_refused(vector, small_llama, wide_llama):
    fake = vector.replace(model=dataclasses.replace(vector.model, model_id="someone-else"))
    with pytest.raises(ValueError, match="model id 'someone-else' vs 'tiny-llama-48'"):
        make_steering(small_llama, fake, 1.0)
    make_steering(small_llama, fake, 1.0, strict=False)  # the escape hatch
    with pytest.raises(ValueError, match="d_model 48 vs the model's 80"):
        make_steering(wide_llama, vector, 1.0, strict=False)


def test_vector_of_other_weight_processing_is_refused(vector, small_llama):
    folded = vector.replace(
        model=dataclasses.replace(vector.model, weight_processing="compatibility")
    )
    with pytest.raises(ValueError, match="weight processing 'compatibility'"):
        make_steering(small_llama, folded, 1.0)


def test_other_layer_count_is_refused(vector, small_llama):
    deeper = vector.replace(model=dataclasses.replace(vector.model, n_layers=7))
    with pytest.raises(ValueError, match="7 layers vs the model's 3"):
        make_steering(small_llama, deeper, 1.0)


def test_missing_layer_is_refused(vector, small_llama):
    with pytest.raises(ValueError, match=r"no vector for layers \[1\]"):
        make_steering(small_llama, vector, 1.0, layers=[1])


def test_map_refuses_vector_of_wrong_source(rmap, vector, wide_llama):
    other = mean_difference(wide_llama, TEXTS[:2], TEXTS[2:])
    with pytest.raises(ValueError, match="width 80"):
        rmap.transplant(other)
    renamed = vector.replace(model=dataclasses.replace(vector.model, model_id="not-the-source"))
    with pytest.raises(ValueError, match="not-the-source"):
        rmap.transplant(renamed)


def test_map_check_models(rmap, small_llama, small_gemma, wide_llama):
    rmap.check_models(small_llama, small_gemma)
    with pytest.raises(ValueError, match="source side"):
        rmap.check_models(wide_llama, small_gemma)
