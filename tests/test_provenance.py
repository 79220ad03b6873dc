"""One provenance type on every artifact, and one compatibility check with one message."""

import dataclasses

import pytest
import torch

from contrans_tl.concepts import ConceptVector
from contrans_tl.maps import ResidualMap
from contrans_tl.provenance import ModelProvenance, as_provenance, check_compatible

P = ModelProvenance(
    model_id="m",
    source="object",
    revision=None,
    file_sha256=None,
    dtype="float32",
    weight_processing="none",
    architecture="LlamaForCausalLM",
    n_layers=3,
    d_model=4,
    d_vocab=10,
)


def test_as_provenance_takes_a_provenance_or_its_dict_and_names_missing_keys():
    assert as_provenance(P) is P
    assert as_provenance(P.to_dict()) == P
    with pytest.raises(ValueError, match=r"vector's model: .*missing key\(s\) \['source'"):
        as_provenance({"model_id": "m", "d_model": 4, "n_layers": 3}, "vector's model")
    with pytest.raises(TypeError, match="ModelProvenance"):
        as_provenance("m")


@pytest.mark.parametrize(
    ("change", "strict", "match"),
    [
        ({"d_model": 5}, True, r"made for 'm' and does not fit 'm': d_model 4 vs the model's 5"),
        ({"n_layers": 7}, False, r"does not fit 'm': 3 layers vs the model's 7"),
        ({"model_id": "n"}, True, r"model id 'm' vs 'n'.*strict=False"),
        ({"weight_processing": "compatibility"}, True, "weight processing 'none' vs"),
    ],
)
def test_check_compatible_names_each_mismatch(change, strict, match):
    other = dataclasses.replace(P, **change)
    with pytest.raises(ValueError, match=match):
        check_compatible(P, other, what="x", strict=strict)


def test_check_compatible_lets_same_shape_through_without_strict():
    check_compatible(P, dataclasses.replace(P, model_id="n", revision="r2"), what="x", strict=False)
    check_compatible(P.to_dict(), P, what="x")


def test_artifacts_hold_typed_provenance_and_keep_it_through_save(tmp_path, as_users_run_it):
    v = ConceptVector(torch.ones(2, 4), (0, 2), P.to_dict(), "c")  # a dict is made typed
    assert v.model == P and isinstance(v.model, ModelProvenance)
    v.save(tmp_path / "v")
    assert ConceptVector.load(tmp_path / "v").model == P
    tgt = dataclasses.replace(P, model_id="t", d_model=6, n_layers=2)
    m = ResidualMap(
        layer_pairs=[(0, 0), (2, 1)],
        weights={0: torch.ones(4, 6), 1: torch.ones(4, 6)},
        biases={0: torch.zeros(6), 1: torch.zeros(6)},
        source=P,
        target=tgt.to_dict(),
        method="svd",
        pairing="last",
    )
    assert m.target == tgt
    m.save(tmp_path / "m")
    back = ResidualMap.load(tmp_path / "m")
    assert (back.source, back.target) == (P, tgt)
    out = back.transplant(v)
    assert out.model == tgt and out.metadata["source_model"] == "m"
    with pytest.raises(ValueError, match="missing key"):
        ConceptVector(torch.ones(1, 4), (0,), {"model_id": "m", "d_model": 4}, "c")


def test_the_map_refuses_another_models_vector_with_the_shared_message():
    v = ConceptVector(torch.ones(1, 4), (0,), dataclasses.replace(P, model_id="other"), "c")
    m = ResidualMap([(0, 0)], {0: torch.ones(4, 4)}, {0: torch.zeros(4)}, P, P, "svd", "last")
    with pytest.raises(ValueError, match=r"model id 'other' vs 'm'.*strict=False"):
        m.transplant(v)
    assert m.transplant(v, strict=False).layers == (0,)
