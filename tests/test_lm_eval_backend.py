"""The lm-evaluation-harness backend: its MC1 is contrans_tl's, its answers are the model's."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_gemma3_hf

lm_eval = pytest.importorskip("lm_eval")  # pinned in the test extra; absent only by hand
from lm_eval.api.instance import Instance  # noqa: E402

from contrans_tl.concepts import ConceptVector  # noqa: E402
from contrans_tl.evals.truthfulqa import evaluate_mc, load_truthfulqa  # noqa: E402
from contrans_tl.lm_eval_backend import (  # noqa: E402
    TASKS_DIR,
    ContransLM,
    build_intervention,
    task_manager,
)
from contrans_tl.provenance import model_provenance  # noqa: E402
from contrans_tl.steering import generate, make_steering  # noqa: E402


def _vector(model, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    rows = scale * torch.randn(model.cfg.n_layers, model.cfg.d_model, generator=g)
    return ConceptVector(rows, tuple(range(model.cfg.n_layers)), model_provenance(model), "x")


def _mc1(lm, limit, task="contrans_truthfulqa_mc1"):
    res = lm_eval.simple_evaluate(
        model=lm, tasks=[task], task_manager=task_manager(), limit=limit, log_samples=True
    )
    samples = res["samples"][task]
    return res["results"][task]["acc,none"], sorted(samples, key=lambda s: s["doc_id"])


def _request(kind, args, idx=0):
    return Instance(request_type=kind, doc={}, arguments=args, idx=idx)


@pytest.mark.parametrize("model_name", ["small_gemma", "small_llama"])
def test_mc1_equals_contrans_tl_truthfulqa(model_name, request):
    model = request.getfixturevalue(model_name)
    questions = load_truthfulqa()[:12]
    for intervention in (None, make_steering(model, _vector(model), 1.0)):
        acc, samples = _mc1(ContransLM(model=model, intervention=intervention), limit=12)
        ours = evaluate_mc(model, questions, chat=False, intervention=intervention)
        assert acc == pytest.approx(ours["mc1"])
        for s, rec in zip(samples, ours["records"]):
            got = [ll for ll, _ in s["filtered_resps"]]
            assert got == pytest.approx(rec["scores"], abs=1e-4)
    assert ours["inexact_splits"] == 0  # lm-eval's split is the tokenizer's own here too


def test_steering_moves_the_scores(small_gemma):
    plain = ContransLM(model=small_gemma)
    steered = ContransLM(model=small_gemma, vector=_vector(small_gemma), alpha="2")
    reqs = [_request("loglikelihood", ("Q: Is water wet?\nA:", " Yes."))]
    (a, _), (b, _) = plain.loglikelihood(reqs)[0], steered.loglikelihood(reqs)[0]
    assert abs(a - b) > 1e-2
    assert steered.intervention.describe()["alphas"] == [2.0]


def test_loglikelihood_and_greedy_by_hand(small_llama):
    lm = ContransLM(model=small_llama, batch_size=2)
    ctx = "The cat sat on the"
    ids = lm.tok_encode(ctx)
    with torch.no_grad():
        nxt = int(small_llama(torch.tensor([ids]))[0, -1].argmax())
    greedy_text = small_llama.tokenizer.decode([nxt])
    reqs = [
        _request("loglikelihood", (ctx, " mat")),
        _request("loglikelihood", (ctx, greedy_text)),
        _request("loglikelihood", ("A dog", " ran home.")),
    ]
    got = lm.loglikelihood(reqs)
    for (c, cont), (ll, greedy) in zip([r.args for r in reqs], got):
        cids, tids = lm._encode_pair(c, cont)
        with torch.no_grad():
            logits = small_llama(torch.tensor([cids + tids]))[0]
        lp = torch.log_softmax(logits.float(), -1)
        rows = range(len(cids) - 1, len(cids) - 1 + len(tids))
        assert ll == pytest.approx(sum(float(lp[r, t]) for r, t in zip(rows, tids)), abs=1e-4)
        assert greedy == all(int(logits[r].argmax()) == t for r, t in zip(rows, tids))
    assert lm.tok_encode(greedy_text, add_special_tokens=False) == [nxt]
    assert got[1][1] is True


def test_loglikelihood_rolling_is_the_whole_text(small_gemma):
    lm = ContransLM(model=small_gemma)
    text = "Birds fly south in winter. Fish swim."
    (total,) = lm.loglikelihood_rolling([_request("loglikelihood_rolling", (text,))])
    ids = [lm.prefix_token_id] + lm.tok_encode(text, add_special_tokens=False)
    with torch.no_grad():
        lp = torch.log_softmax(small_gemma(torch.tensor([ids]))[0].float(), -1)
    assert total == pytest.approx(
        sum(float(lp[j, ids[j + 1]]) for j in range(len(ids) - 1)), abs=1e-3
    )


def test_generate_until_is_steered_greedy_and_cut(small_gemma):
    steering = make_steering(small_gemma, _vector(small_gemma, seed=2), 1.0)
    lm = ContransLM(model=small_gemma, intervention=steering)
    prompts = ["Once upon a time", "The answer is"]
    want = generate(small_gemma, prompts, max_new_tokens=6, intervention=steering)
    reqs = [_request("generate_until", (p, {"until": [], "max_gen_toks": 6})) for p in prompts]
    assert lm.generate_until(reqs) == want
    stop = want[0][2:4]
    cut = lm.generate_until(
        [_request("generate_until", (prompts[0], {"until": [stop], "max_gen_toks": 6}))]
    )
    assert cut == [want[0].split(stop, 1)[0]]
    with pytest.raises(ValueError, match="generates greedily"):
        lm.generate_until([_request("generate_until", (prompts[0], {"do_sample": True}))])


def test_bad_arguments_are_named(small_llama):
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['alhpa'\].*alpha"):
        ContransLM(model=small_llama, alhpa=2)
    with pytest.raises(ValueError, match="needs both donor= and modules="):
        build_intervention(small_llama, modules="gate@1")
    with pytest.raises(ValueError, match="alpha must be a number"):
        build_intervention(small_llama, vector=_vector(small_llama), alpha="strong")
    with pytest.raises(ValueError, match="dtype must be"):
        ContransLM(model="nowhere", dtype="int8")
    assert build_intervention(small_llama) is None


def test_module_swap_and_stack(small_llama, byte_tokenizer):
    from conftest import tiny_llama

    donor = tiny_llama(byte_tokenizer, d_model=48, n_layers=3, seed=7, name="tiny-llama-48")
    both = build_intervention(
        small_llama, donor=donor, modules="gate@1+up@2", vector=_vector(small_llama), alpha=1
    )
    names = [type(p).__name__ for p in both.parts]
    assert names == ["ModuleTransplant", "Steering"]
    assert both.parts[0].modules == ["gate@1", "up@2"]
    reqs = [_request("loglikelihood", ("A dog", " ran home."))]
    swapped = ContransLM(model=small_llama, donor=donor, modules="gate@1+up@2")
    (a, _), (b, _) = (
        ContransLM(model=small_llama).loglikelihood(reqs)[0],
        swapped.loglikelihood(reqs)[0],
    )
    assert abs(a - b) > 1e-3


def test_task_configs_ship_and_load():
    assert sorted(p.name for p in TASKS_DIR.glob("*.yaml")) == [
        "contrans_truthfulqa_mc1.yaml",
        "contrans_truthfulqa_mc1_primer.yaml",
    ]
    tm = task_manager()
    tasks = tm.load_task_or_group(["contrans_truthfulqa_mc1_primer"])
    (task,) = tasks.values()
    docs = list(task.validation_docs())
    assert len(docs) == 817
    first = task.doc_to_text(docs[0])
    assert first.startswith("Q: What is human life expectancy") and first.endswith(
        "Q: " + docs[0]["question"] + "\nA:"
    )


def test_command_line_runs_the_backend(tmp_path, meta_tokenizer, small_gemma):
    """lm-eval's own command line (through contrans-lm-eval), a model from a folder and a
    llama.cpp control vector as the intervention."""
    folder = tmp_path / "tiny"
    hf = tiny_gemma3_hf(meta_tokenizer)
    hf.save_pretrained(folder)
    meta_tokenizer.save_pretrained(folder)
    from contrans_tl.models import load_model

    model = load_model(str(folder))
    vec = _vector(model, seed=4)
    gguf = vec.select(vec.layers[1:]).to_gguf(tmp_path / "v.gguf")
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "contrans_tl.lm_eval_backend", "run", "--model", "contrans",
        "--model_args", f"model={folder},vector={gguf},alpha=1.5",
        "--tasks", "contrans_truthfulqa_mc1", "--limit", "5", "--output_path", str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = out.rglob("results_*.json")
    acc = json.loads(path.read_text())["results"]["contrans_truthfulqa_mc1"]["acc,none"]
    steering = make_steering(model, ConceptVector.from_gguf(gguf, model), 1.5)
    ours = evaluate_mc(model, load_truthfulqa()[:5], chat=False, intervention=steering)
    assert acc == pytest.approx(ours["mc1"])


@pytest.mark.slow
def test_mc1_on_a_real_slice():
    """gemma-3-270m, the first 40 questions, base and under its own random direction."""
    from contrans_tl.models import load_model

    model = load_model("gemma-3-270m")
    questions = load_truthfulqa()[:40]
    for intervention in (None, make_steering(model, _vector(model, scale=0.5), 1.0)):
        acc, samples = _mc1(ContransLM(model=model, intervention=intervention), limit=40)
        ours = evaluate_mc(model, questions, chat=False, intervention=intervention)
        assert acc == pytest.approx(ours["mc1"])
        for s, rec in zip(samples, ours["records"]):
            assert [ll for ll, _ in s["filtered_resps"]] == pytest.approx(rec["scores"], abs=1e-3)
