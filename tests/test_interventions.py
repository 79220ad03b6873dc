"""Interventions: weight swaps restored bit for bit, stacks, instructions, the protocol."""

import pytest
import torch
from conftest import tiny_llama, tiny_llama_hf

from contrans_tl.interventions import (
    Instruction,
    Intervention,
    Stack,
    WeightSwap,
    applied,
    describe,
    donor_weights,
    parameter_table,
)

GATE = "model.layers.1.mlp.gate_proj.weight"
UP = "model.layers.2.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def donor(byte_tokenizer):
    """Same architecture and sizes as small_llama, other weights."""
    return tiny_llama(byte_tokenizer, d_model=48, n_layers=3, seed=5, name="tiny-llama-donor")


@pytest.fixture
def ids(small_llama):
    return small_llama.tokenizer(["The cat sat on the mat ."], return_tensors="pt")["input_ids"]


def _snapshot(model):
    return {n: p.detach().clone() for n, p in parameter_table(model).items()}


def _assert_bit_equal(model, snap):
    now = parameter_table(model)
    assert now.keys() == snap.keys()
    for n, p in now.items():
        assert torch.equal(p, snap[n]), n


def test_swap_equals_a_model_built_with_the_donor_modules(small_llama, donor, ids, byte_tokenizer):
    weights = donor_weights(donor, [GATE, UP])
    reference = tiny_llama_hf(byte_tokenizer, d_model=48, n_layers=3, seed=0)
    state = reference.state_dict()
    for n, w in weights.items():
        state[n] = w
    reference.load_state_dict(state)
    before = small_llama(ids)
    snap = _snapshot(small_llama)
    with WeightSwap(small_llama, weights, name="dapa") as swap:
        inside = small_llama(ids)
        assert swap.active
    with torch.no_grad():
        want = reference(ids).logits
    torch.testing.assert_close(inside, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(inside, before, atol=1e-4)  # the swap changed something
    _assert_bit_equal(small_llama, snap)
    torch.testing.assert_close(small_llama(ids), before, atol=0, rtol=0)


def test_swap_restores_after_an_exception_and_nests(small_llama, donor, ids):
    snap = _snapshot(small_llama)
    swap = WeightSwap(small_llama, donor_weights(donor, [GATE]))
    with pytest.raises(RuntimeError, match="inside"), swap:
        raise RuntimeError("inside")
    _assert_bit_equal(small_llama, snap)
    with swap:
        swapped = small_llama(ids)
        with swap:
            pass
        torch.testing.assert_close(small_llama(ids), swapped, atol=0, rtol=0)  # still on
    _assert_bit_equal(small_llama, snap)


def test_swap_describes_what_it_changed(small_llama, donor):
    swap = WeightSwap(small_llama, donor_weights(donor, [GATE]), name="dapa", metadata={"k": 1})
    d = swap.describe()
    table = parameter_table(small_llama)
    total = sum(p.numel() for p in table.values())
    assert d["parameters"] == [GATE] and d["n_parameters_swapped"] == table[GATE].numel()
    assert d["fraction_of_parameters"] == pytest.approx(table[GATE].numel() / total)
    assert d["metadata"] == {"k": 1} and d["name"] == "dapa"
    assert isinstance(swap, Intervention)


def test_swap_refuses_bad_weights(small_llama, wide_llama, donor):
    with pytest.raises(KeyError, match=r"not in the model.*close names"):
        WeightSwap(small_llama, {"model.layers.1.mlp.gate.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"shape \(168, 80\) but the parameter has \(104, 48\)"):
        WeightSwap(small_llama, donor_weights(wide_llama, [GATE]))
    bad = donor_weights(donor, [GATE])
    bad[GATE][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        WeightSwap(small_llama, bad)
    with pytest.raises(ValueError, match="at least one"):
        WeightSwap(small_llama, {})
    swap = WeightSwap(small_llama, donor_weights(donor, [GATE]))
    with pytest.raises(ValueError, match="make one for this model"), applied(swap, donor):
        pass


def test_stack_enters_in_order_and_undoes_all_when_a_part_fails(small_llama, donor, ids):
    snap = _snapshot(small_llama)
    good = WeightSwap(small_llama, donor_weights(donor, [GATE]), name="a")

    class Failing(WeightSwap):
        def _apply(self):
            raise RuntimeError("cannot apply")

    failing = Failing(small_llama, donor_weights(donor, [UP]), name="b")
    with pytest.raises(RuntimeError, match="cannot apply"), Stack([good, failing]):
        pass
    assert not good.active
    _assert_bit_equal(small_llama, snap)
    both = Stack([good, WeightSwap(small_llama, donor_weights(donor, [UP]), name="c")])
    assert both.name == "a+c" and [p["name"] for p in both.describe()["parts"]] == ["a", "c"]
    with both:
        assert good.active
    _assert_bit_equal(small_llama, snap)
    with pytest.raises(ValueError, match="another model"):
        Stack([good, WeightSwap(donor, donor_weights(donor, [UP]))])


def test_instruction_and_base():
    model = object()
    inst = Instruction(model, "Be honest.")
    with inst:
        pass
    assert inst.describe() == {"name": "inst_align", "kind": "Instruction", "text": "Be honest."}
    assert isinstance(inst, Intervention)
    with pytest.raises(ValueError, match="needs some text"):
        Instruction(model, "  ")
    assert describe(None) == {"name": "base"}


def test_steering_is_an_intervention_and_stacks_with_a_swap(small_llama, donor, ids):
    from contrans_tl.concepts import ConceptVector
    from contrans_tl.models import model_provenance
    from contrans_tl.steering import make_steering

    n, d = small_llama.cfg.n_layers, small_llama.cfg.d_model
    v = ConceptVector(
        torch.randn(n, d, generator=torch.Generator().manual_seed(0)),
        tuple(range(n)),
        model_provenance(small_llama),
        "fear",
    )
    steering = make_steering(small_llama, v, 2.0, layers=[0, 2])
    assert isinstance(steering, Intervention) and steering.name == "fear"
    d_ = steering.describe()
    assert d_["concepts"] == ["fear"] and d_["alphas"] == [2.0] and d_["layers"] == [0, 2]
    assert d_["addition_norms"]["0"] == pytest.approx(2.0 * float(v[0].norm()))
    swap = WeightSwap(small_llama, donor_weights(donor, [GATE]), name="dapa")
    with swap, steering:
        want = small_llama(ids)
    snap = _snapshot(small_llama)
    with Stack([swap, steering]) as both:
        got = small_llama(ids)
        assert both.name == "dapa+fear"
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    _assert_bit_equal(small_llama, snap)
    assert not steering.attached


def _vector(model, seed=0):
    from contrans_tl.concepts import ConceptVector
    from contrans_tl.models import model_provenance

    n, d = model.cfg.n_layers, model.cfg.d_model
    g = torch.Generator().manual_seed(seed)
    return ConceptVector(
        torch.randn(n, d, generator=g), tuple(range(n)), model_provenance(model), "c"
    )


def test_forward_tells_a_steering_inside_a_stack_where_generated_tokens_are(small_llama, donor):
    """A ``positions="generated"`` steering adds nothing to prompt tokens; inside a Stack it
    must still be told where generation starts, or it would steer nothing at all."""
    from contrans_tl.steering import generate, make_steering

    prompts = ["The cat sat on", "A dog ."]
    steering = make_steering(small_llama, _vector(small_llama), 8.0, positions="generated")
    swap = WeightSwap(small_llama, donor_weights(donor, [GATE]), name="dapa")
    kw = dict(max_new_tokens=4, decode=False, stop_at_eos=False)
    with swap:
        swap_only = generate(small_llama, prompts, **kw)
        separate = generate(small_llama, prompts, intervention=steering, **kw)
    stacked = generate(small_llama, prompts, intervention=Stack([swap, steering]), **kw)
    assert stacked == separate
    assert stacked != swap_only  # the steering did act on the generated tokens
    assert steering.state.prompt_length is None and not steering.attached and not swap.active


def test_evaluations_take_an_instruction_as_intervention(small_llama):
    from contrans_tl.evals.truthfulqa import evaluate_mc, load_truthfulqa

    questions = load_truthfulqa()[:3]
    given = evaluate_mc(small_llama, questions, instruction="Be honest.", chat=False)
    inst = Instruction(small_llama, "Be honest.")
    carried = evaluate_mc(small_llama, questions, intervention=inst, chat=False)
    plain = evaluate_mc(small_llama, questions, chat=False)
    assert carried["mc1"] == given["mc1"] and carried["records"] == given["records"]
    assert carried["instruction"] == "Be honest." and plain["instruction"] is None
    with pytest.raises(ValueError, match="given twice"):
        evaluate_mc(small_llama, questions, instruction="Be fair.", intervention=inst, chat=False)
    two = Stack([inst, Instruction(small_llama, "Be kind.")])
    with pytest.raises(ValueError, match="2 instructions"):
        evaluate_mc(small_llama, questions, intervention=two, chat=False)
