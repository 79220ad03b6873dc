"""StepStore: stored steps are reused only with the same inputs, and a step never
overwrites an artifact of the same name."""

import pytest
import torch

from contrans_tl.io import load_artifact, save_artifact
from contrans_tl.pipelines.steps import StepStore


def test_a_step_is_reused_with_the_same_inputs_only(tmp_path):
    store = StepStore(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return {"x": len(calls)}

    assert store.get_or_compute("s", {"a": 1}, compute) == {"x": 1}
    assert store.get_or_compute("s", {"a": 1}, compute) == {"x": 1}
    assert store.get_or_compute("s", {"a": 2}, compute) == {"x": 2}
    assert len(calls) == 2


def test_a_step_never_overwrites_an_artifact_of_its_name(tmp_path):
    """The bug this guards: the DAPA-pair RE-Control step ``recontrol_value`` saved its
    value network as the artifact ``recontrol_value`` and then wrote the step's JSON over
    the artifact's, so the network no longer loaded."""
    store = StepStore(tmp_path)

    def save_then_return():
        save_artifact(tmp_path / "v", {"w": torch.ones(2)}, {"kind": "k"})
        return {"ok": True}

    with pytest.raises(ValueError, match="overwrite the JSON of the artifact"):
        store.get_or_compute("v", {"a": 1}, save_then_return)
    tensors, _ = load_artifact(tmp_path / "v", kind="k")  # the artifact is intact
    assert torch.equal(tensors["w"], torch.ones(2))
    with pytest.raises(ValueError, match="overwrite the JSON of the artifact"):
        store.get("v", {"a": 1})
