"""Write experiments/REPORT.md from the JSON under experiments/results/ (issue 4).

    python experiments/make_report.py

Reads only files that the experiment scripts wrote; every number in the report comes from
them. A pair or table whose results are missing is listed as "not run".
"""

import argparse
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ALIGN = RESULTS / "alignment"
PAIRS = [
    ("smollm2-135m-instruct", "gemma-3-270m", "weak aligned -> base, across families"),
    ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct", "same family (Table 6)"),
    ("qwen2.5-coder-0.5b-instruct", "gemma-3-270m", "weak aligned -> base, across families"),
]
SHORT = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct",
    "gemma-3-270m": "Gemma-3-270m",
    "qwen2.5-coder-0.5b-instruct": "Qwen2.5-Coder-0.5B-Instruct",
    "qwen2.5-coder-1.5b-instruct": "Qwen2.5-Coder-1.5B-Instruct",
}


def load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def pair_name(src: str, tgt: str) -> str:
    return f"{SHORT[src]} → {SHORT[tgt]}"


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def run_file(src: str, tgt: str, key: str) -> dict[str, Any] | None:
    for folder in (ALIGN / f"{src}__{tgt}", ALIGN / f"target__{tgt}"):
        got = load(folder / "runs" / f"{key}.json")
        if got is not None:
            return got
    return None


def mcnemar(a: list[bool], b: list[bool]) -> tuple[int, int, float]:
    """(b_only, a_only, exact two-sided p) for paired binary outcomes a (reference), b."""
    from contrans_tl.pipelines.dapa import mcnemar as exact

    t = exact(a, b)
    return t["gained"], t["lost"], t["p"]


def paired(src: str, tgt: str, base_key: str, key: str, field: str) -> str:
    """'+g/-l, p=..' comparing a method's per-item outcomes with Base's."""
    ref, got = run_file(src, tgt, base_key), run_file(src, tgt, key)
    if ref is None or got is None:
        return ""
    if field == "correct":
        a = [bool(r["correct"]) for r in ref["records"]]
        b = [bool(r["correct"]) for r in got["records"]]
    else:  # toxic: "better" is not toxic
        thr = ref["threshold"]
        a = [r["score"] <= thr for r in ref["records"]]
        b = [r["score"] <= thr for r in got["records"]]
    if len(a) != len(b):
        return ""
    g, lost, p = mcnemar(a, b)
    return f"+{g}/−{lost}, p={p:.2g}"


def tqa_table(pairs: list[tuple[str, str, str, dict[str, Any]]]) -> list[str]:
    out = [
        "| method | " + " | ".join(pair_name(s, t) for s, t, _, _ in pairs) + " |",
        "|---|" + "---|" * len(pairs),
    ]
    labels = [
        ("base", "Base"),
        ("align", "Align-Training"),
        ("inst", "Inst-Align"),
        ("self_clean", "Self-Align (clean)"),
        ("contrans_clean", "ConTrans (clean)"),
        ("contrans_paper", "ConTrans (paper protocol)"),
        ("both", "ConTrans, honesty + fairness"),
        ("random", "Control: random direction, ConTrans norms and α"),
    ]
    for key, label in labels:
        cells = []
        for s, t, _, r in pairs:
            tq = r.get("truthfulqa", {})
            if key == "align":
                cells.append(align_cell(s, t))
            elif key == "both":
                b = r.get("both")
                cells.append(f"{pct(b['mc1'])} (α={b['alpha_honesty']:g})" if b else "not run")
            elif (
                key not in tq
                and key.startswith("self")
                and same_target(pairs, s, t, "truthfulqa", key)
            ):
                cells.append(f"as in {same_target(pairs, s, t, 'truthfulqa', key)} (same target)")
            elif key in tq:
                row = tq[key]
                cell = pct(row["mc1"])
                if "alpha" in row:
                    cell += f" (α={row['alpha']:g}"
                    hp = r.get("perplexity", {}).get(f"{key}_honesty")
                    if hp:
                        cell += f"; PPL {hp['ppl']:.1f}"
                    cmp = paired(s, t, tq["base"]["key"], row["key"], "correct")
                    cell += f"; vs Base {cmp})" if cmp else ")"
                elif key == "inst":
                    cmp = paired(s, t, tq["base"]["key"], row["key"], "correct")
                    cell += f" (vs Base {cmp})" if cmp else ""
                cells.append(cell)
            else:
                cells.append("not run")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out


def same_target(
    pairs: list[tuple[str, str, str, dict[str, Any]]], src: str, tgt: str, part: str, key: str
) -> str:
    """The name of another pair with the same target that has this row, or ''."""
    for s, t, _, r in pairs:
        if t == tgt and s != src and key in r.get(part, {}):
            return pair_name(s, t)
    return ""


def align_cell(src: str, tgt: str) -> str:
    if tgt.endswith("instruct"):
        return "= Base (the target is the instruct model)"
    return "n/a (no instruct model of this size offline)"


def tox_table(pairs: list[tuple[str, str, str, dict[str, Any]]]) -> list[str]:
    out = [
        "| method | " + " | ".join(pair_name(s, t) for s, t, _, _ in pairs) + " |",
        "|---|" + "---|" * len(pairs),
    ]
    labels = [
        ("base", "Base"),
        ("align", "Align-Training"),
        ("inst", "Inst-Align"),
        ("self", "Self-Align"),
        ("proxy", "EFT / proxy-tuning"),
        ("contrans", "ConTrans"),
        ("both", "ConTrans, honesty + fairness"),
        ("random", "Control: random direction, ConTrans norms and α"),
    ]
    for key, label in labels:
        cells = []
        for s, t, _, r in pairs:
            tx = r.get("toxigen", {})
            ppl = r.get("perplexity", {})
            if key == "align":
                cells.append(align_cell(s, t))
            elif key == "proxy":
                cells.append("n/a (no strong-base / weak-aligned / weak-base triple offline)")
            elif key == "both":
                b = r.get("both")
                cells.append(
                    f"{pct(b['toxic_share'])} (PPL {b['ppl']:.1f}; α={b['alpha_fairness']:g}; "
                    f"empty {b['n_empty']})"
                    if b
                    else "not run"
                )
            elif key not in tx and key == "self" and same_target(pairs, s, t, "toxigen", key):
                cells.append(f"as in {same_target(pairs, s, t, 'toxigen', key)} (same target)")
            elif key in tx:
                row = tx[key]
                p = ppl.get("base", {}).get("ppl") if key == "base" else None
                if key in ("self", "contrans") and f"{key}_fairness" in ppl:
                    p = ppl[f"{key}_fairness"]["ppl"]
                if key == "random":
                    p = row.get("ppl")
                cell = pct(row["toxic_share"]) + (f" (PPL {p:.1f}" if p else " (PPL n/a")
                if "alpha" in row:
                    cell += f"; α={row['alpha']:g}"
                if key != "base":
                    cmp = paired(s, t, tx["base"]["key"], row["key"], "toxic")
                    if cmp:
                        cell += f"; non-toxic vs Base {cmp}"
                cell += f"; empty {row['n_empty']})"
                cells.append(cell)
            else:
                cells.append("not run")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out


def sweeps(pairs: list[tuple[str, str, str, dict[str, Any]]]) -> list[str]:
    out = []
    for s, t, _, r in pairs:
        out.append(f"**{pair_name(s, t)}**")
        out.append("")
        tq = r.get("truthfulqa", {})
        base_val = tq.get("base_val", {}).get("mc1")
        for name, row in tq.items():
            if "val_grid" in row:
                grid = ", ".join(f"α={a}: {pct(v)}" for a, v in row["val_grid"].items())
                out.append(
                    f"- TruthfulQA validation MC1, {name}: {grid} (Base {pct(base_val)}); "
                    f"picked α={row['alpha']:g}"
                )
        tx = r.get("toxigen", {})
        base_val = tx.get("base_val", {}).get("toxic_share")
        for name, row in tx.items():
            if "val_grid" in row:
                grid = ", ".join(
                    f"α={a}: toxic {pct(g['toxic_share'])}, empty {pct(g['empty_share'])}, "
                    f"PPL×{g['ppl_ratio']:.2f}"
                    for a, g in row["val_grid"].items()
                )
                out.append(
                    f"- ToxiGen validation, {name}: {grid} (Base toxic {pct(base_val)}); "
                    f"picked α={row['alpha']:g}"
                )
        out.append("")
    return out


def setup(pairs: list[tuple[str, str, str, dict[str, Any]]]) -> list[str]:
    out = [
        "| pair | kind | map | held-out R² (fitted pairs / last token) | command |",
        "|---|---|---|---|---|",
    ]
    for s, t, kind, r in pairs:
        m = r["map"]
        r2 = [v["r2"] for v in m["metrics"].values()]
        r2l = [v.get("r2_last") for v in m["metrics"].values() if v.get("r2_last") is not None]
        last = f"{sum(r2l) / len(r2l):.3f}" if r2l else "–"
        out.append(
            f"| {pair_name(s, t)} | {kind} | {m['method']}, {m['pairing']} pairs, "
            f"{m['n_texts']} WikiSplit sentences (10% held out) | mean {sum(r2) / len(r2):.3f} "
            f"/ {last} | `{r['command']}` |"
        )
    return out


def refine_ablation() -> list[str]:
    out = []
    for folder in sorted((RESULTS / "ablation_refine").glob("*")):
        r = load(folder / "results.json")
        if r is None:
            continue
        out.append(
            f"**{pair_name(r['source'], r['target'])}**, α={r['alpha']:g}, "
            f"{r['n_negatives_per_emotion']} evaluation negatives per emotion (from "
            f"{r['negatives_from']}), refinement pool {r['refine_pool_per_emotion']} per "
            f"emotion. Command: `{r['command']}`"
        )
        out.append("")
        out.append(
            "| n per emotion | ConTrans Token Acc | ConTrans Logit Acc | Self Token Acc "
            "| Self Logit Acc | draws |"
        )
        out.append("|---|---|---|---|---|---|")
        base = [x for x in r["rows"] if x["method"] == "base"][0]
        b_t, b_l = pct(base["token_acc"]), pct(base["logit_acc"])
        out.append(f"| 0 (Base) | {b_t} | {b_l} | {b_t} | {b_l} | 1 |")
        for n in sorted({x["n"] for x in r["rows"] if x["n"] > 0}):
            cells = []
            draws = 0
            for method in ("contrans", "self"):
                for metric in ("token_acc", "logit_acc"):
                    v = [x[metric] for x in r["rows"] if x["method"] == method and x["n"] == n]
                    draws = len(v)
                    mean = sum(v) / len(v)
                    cells.append(
                        f"{pct(mean)} ({pct(min(v))}–{pct(max(v))})" if len(v) > 1 else pct(mean)
                    )
            out.append(f"| {n} | " + " | ".join(cells) + f" | {draws} |")
        out.append("")
    return out or ["not run", ""]


def emotion_summary() -> list[str]:
    out = []
    for folder in sorted((RESULTS / "emotion").glob("*")):
        r = load(folder / "results.json")
        if r is None:
            continue
        src, tgt = r["source"]["model_id"], r["target"]["model_id"]
        out.append(f"**{SHORT.get(src, src)} → {SHORT.get(tgt, tgt)}** (`{r['command']}`)")
        out.append("")
        out.append("| method | α | Token Acc | Logit Acc |")
        out.append("|---|---|---|---|")
        for method, row in r["summary"].items():
            out.append(
                f"| {method} | {row['alpha']:g} | {pct(row['token_acc'])} | "
                f"{pct(row['logit_acc'])} |"
            )
        out.append("")
    return out


FIGURES = [
    ("alpha_sweep", "Token Acc and perplexity against α (pick α here)"),
    ("layer_similarity", "linear CKA, source × target layer, with the suggested matching"),
    (
        "layer_similarity_r2",
        "held-out map R², source × target layer: the matching this run's map was fitted on",
    ),
    ("vector_cosines", "transplanted vs Self vector, cosine per target layer"),
    ("norm_profile", "residual and vector norms per relative depth"),
    ("pca_before_after", "target states before → after adding the vector (Fig. 2b)"),
    ("tsne", "t-SNE of the six emotions in both models (Figs. 7, 8)"),
    ("separation", "silhouette and linear-probe accuracy per layer"),
]


def _layer_match(a: dict[str, Any]) -> str:
    """How the run's map paired layers (a loaded map is compared with the depth matching)."""
    m = a.get("map", {})
    if "loaded_from" in m:
        from contrans_tl.maps import match_layers_by_depth

        depth = match_layers_by_depth(a["source"]["n_layers"], a["target"]["n_layers"])
        same = [tuple(p) for p in m["layer_pairs"]] == [tuple(p) for p in depth]
        return "depth (loaded map)" if same else "loaded map, its own pairs"
    return str(m.get("layer_match", a.get("settings", {}).get("layer_match", "depth")))


def layer_match_comparison(runs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Transplanted-vector sweeps of runs of one pair whose maps pair layers differently."""
    out = [
        "| run | map layers | steered | picked α | Token Acc | PPL | best Token Acc (α, PPL) |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for name, a in runs:
        sweep = a["alpha_sweep"]
        base = {r["layers"]: r for r in sweep["rows"] if r["alpha"] == 0.0}
        for series, alpha in sweep["picked"].items():
            rows = [r for r in sweep["rows"] if r["series"] == series]
            if not rows or rows[0]["method"] != "transplanted":
                continue
            at = next((r for r in rows if r["alpha"] == alpha), None)
            best = max(rows, key=lambda r: (r["token_acc"], -r["alpha"]))
            ppl0 = base.get(rows[0]["layers"], {}).get("ppl")

            def ppl(r: dict[str, Any] | None, ppl0: float | None = ppl0) -> str:
                if r is None or r.get("ppl") is None:
                    return "-"
                rel = f" (×{r['ppl'] / ppl0:.2f})" if ppl0 else ""
                return f"{r['ppl']:.1f}{rel}"

            out.append(
                f"| {name} | {_layer_match(a)} | {rows[0]['layers']} | "
                f"{'-' if alpha is None else format(alpha, 'g')} | "
                f"{'-' if at is None else format(at['token_acc'], '.2f')} | {ppl(at)} | "
                f"{best['token_acc']:.2f} (α {best['alpha']:g}, PPL {ppl(best)}) |"
            )
    return out + [""]


def analysis_section() -> list[str]:
    out = []
    by_pair: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for folder in sorted((RESULTS / "analysis").glob("*")):
        a = load(folder / "analysis.json")
        if a is None:
            continue
        rel = folder.relative_to(HERE)
        parts = folder.name.split("__")
        title = " → ".join(parts[:2]) + (f" ({', '.join(parts[2:])})" if parts[2:] else "")
        by_pair.setdefault("__".join(parts[:2]), []).append((folder.name, a))
        out += [
            f"**{title}**: `{a.get('command', '')}`; map layers: {_layer_match(a)}; headline "
            f"numbers and token tables in [`{rel}/summary.md`]({rel}/summary.md).",
            "",
        ]
        honesty = sorted(
            folder.glob("token_shifts_honesty_L*.md"), key=lambda p: int(p.stem.split("_L")[-1])
        )
        if honesty:
            links = ", ".join(f"[`{p.name}`]({rel}/{p.name})" for p in honesty)
            out += [
                f"Honesty vector's token shifts (Table 8 format, transplanted beside the "
                f"source's own vector; `experiments/honesty_token_shifts.py`): {links}.",
                "",
            ]
        for name, caption in FIGURES:
            if (folder / f"{name}.png").exists():
                out.append(f"![{caption}]({rel}/{name}.png)")
                out.append(f"*{caption}* (`{name}.png`, numbers in `{name}.json`)")
                out.append("")
    for pair, runs in by_pair.items():
        if len(runs) > 1:
            out += [
                f"**Layer matching, {pair.replace('__', ' → ')}**: the transplanted vectors' "
                "emotion sweep (mean Token Acc over emotions, perplexity with ×base) in runs "
                "whose maps pair layers differently. Picked α: best Token Acc with perplexity "
                "≤ 1.5× base.",
                "",
            ]
            out += layer_match_comparison(runs)
    return out


def findings(pairs: list[tuple[str, str, str, dict[str, Any]]]) -> list[str]:
    out = []
    for s, t, _, r in pairs:
        tq, tx = r.get("truthfulqa", {}), r.get("toxigen", {})
        lines = []
        if "base" in tq and "contrans_clean" in tq:
            d = tq["contrans_clean"]["mc1"] - tq["base"]["mc1"]
            cmp = paired(s, t, tq["base"]["key"], tq["contrans_clean"]["key"], "correct")
            lines.append(
                f"TruthfulQA MC1, ConTrans (clean) − Base = {100 * d:+.1f} points on "
                f"{tq['base']['n']} questions ({cmp})"
            )
        if "base" in tq and "contrans_clean" in tq:
            hp = r.get("perplexity", {}).get("contrans_clean_honesty")
            base_ppl = r.get("perplexity", {}).get("base", {}).get("ppl")
            if hp and base_ppl:
                ratio_h = hp["ppl"] / base_ppl
                lines.append(f"its honesty vector multiplies perplexity by {ratio_h:.2f}")
        if "base" in tq and "random" in tq:
            d = tq["random"]["mc1"] - tq["base"]["mc1"]
            lines.append(
                f"a random direction with the same norms and α: {100 * d:+.1f} points vs Base"
            )
        if "base" in tq and "self_clean" in tq and "contrans_clean" in tq:
            d = tq["contrans_clean"]["mc1"] - tq["self_clean"]["mc1"]
            lines.append(f"ConTrans (clean) − Self-Align = {100 * d:+.1f} points")
        if "base" in tx and "contrans" in tx:
            d = tx["contrans"]["toxic_share"] - tx["base"]["toxic_share"]
            cmp = paired(s, t, tx["base"]["key"], tx["contrans"]["key"], "toxic")
            ppl = r.get("perplexity", {})
            ratio = (
                ppl["contrans_fairness"]["ppl"] / ppl["base"]["ppl"]
                if "contrans_fairness" in ppl
                else float("nan")
            )
            lines.append(
                f"ToxiGen toxic share, ConTrans − Base = {100 * d:+.1f} points on "
                f"{tx['base']['n']} prompts (non-toxic {cmp}); perplexity × {ratio:.2f}"
            )
            if "random" in tx:
                rr = tx["random"]
                dr = rr["toxic_share"] - tx["base"]["toxic_share"]
                lines.append(
                    f"a random direction with ConTrans's norms and α: {100 * dr:+.1f} points "
                    f"(perplexity × {rr['ppl'] / ppl['base']['ppl']:.2f})"
                )
        if lines:
            out.append(f"- **{pair_name(s, t)}**: " + "; ".join(lines) + ".")
    return out


def main() -> None:
    global RESULTS, ALIGN
    ap = argparse.ArgumentParser(description="Write experiments/REPORT.md from the results.")
    ap.add_argument("--results", default=str(RESULTS), help="the results folder")
    ap.add_argument("--out", default=str(HERE / "REPORT.md"))
    args = ap.parse_args()
    RESULTS = Path(args.results)
    ALIGN = RESULTS / "alignment"
    pairs = []
    missing = []
    for s, t, kind in PAIRS:
        r = load(ALIGN / f"{s}__{t}" / "results.json")
        if r is None:
            missing.append(pair_name(s, t))
        else:
            pairs.append((s, t, kind, r))
    clf = next((r["classifier"] for *_, r in pairs if "classifier" in r), None)
    lines = [
        "# ConTrans on the offline models: evaluations and baselines",
        "",
        "Regenerate this file: `python experiments/make_report.py` (reads only "
        "`experiments/results/**/*.json`).",
        "",
        "Produce those results (CPU, one core each; see each script's header):",
        "`bash experiments/run_alignment.sh all` (TruthfulQA, ToxiGen, perplexity, both "
        "concepts), `python experiments/run_refine_ablation.py` (Fig. 5), "
        "`bash experiments/run_emotion.sh all` (emotions, issue 3).",
        "",
    ]
    if missing:
        lines += [f"Not run: {', '.join(missing)}.", ""]
    lines += ["## Findings", ""]
    lines += findings(pairs)
    lines += [
        "",
        "Paired comparisons: `+g/−l` counts the items a method got right (TruthfulQA) or "
        "kept non-toxic (ToxiGen) where Base did not (g) and the reverse (l); p is the exact "
        "two-sided McNemar (sign) test on those discordant items.",
        "",
        "## Setup",
        "",
    ]
    lines += setup(pairs)
    lines += [
        "",
        "- Steering: α·v added to `blocks.{k}.hook_resid_post` of every target layer at every "
        "position (prompt and generated), raw α (no norm scaling); vectors are mean "
        "differences at the last prompt token (paper Eq. 1), mapped with the pair's map.",
        "- Self-Align: the target's own vector from the same prompts. Gemma-3-270m is a base "
        "model and no aligned model of its size loads offline, so its Self-Align vector comes "
        "from the base model itself; Qwen2.5-Coder-1.5B-Instruct's is from the aligned target.",
        "- Inst-Align: TruthfulQA `Answer truthfully and do not lie.` before the question; "
        "ToxiGen `Do not write anything biased, hateful or toxic.` before the instruction.",
        "- Align-Training: Gemma-3-270m-it is not among the offline models; the Qwen pair's "
        "target is itself the instruct model (no Qwen2.5-Coder-1.5B base loads offline), so "
        "its Base row is Align-Training.",
        "- EFT / proxy-tuning (`contrans_tl.baselines.proxy_tuning`) needs a strong base, a "
        "weak aligned and a weak base model with one vocabulary; no offline set has all three, "
        "so it is only tested on tiny random models (`tests/test_proxy_tuning.py`: logits "
        "against a direct sum, vocabulary mismatch refused) and has no row with numbers here.",
    ]
    if clf:
        lines.append(
            f"- Toxicity classifier `{clf['name']}` (logistic regression on all-MiniLM-L6-v2 "
            "features, trained on human-annotated ToxiGen): held-out accuracy "
            f"{clf['held_out_accuracy']:.3f}, ROC-AUC {clf['held_out_roc_auc']:.3f} on "
            f"{int(clf['n_held_out'])} held-out statements (majority class "
            f"{clf['held_out_majority_accuracy']:.3f}). The paper's `tomh/toxigen_roberta` "
            "needs the hub (`load_toxicity_classifier('tomh/toxigen_roberta')`)."
        )
    for _s, _t, _, r in pairs[:1]:
        lines += [
            f"- TruthfulQA split: {r.get('truthfulqa_split', {}).get('eval', '')}; α picked on "
            f"{r.get('truthfulqa_split', {}).get('val', '')}. Protocols: **clean** refines the "
            "honesty vector on the refine half only; **paper** refines it on all 817 "
            "questions (so also on the evaluated ones, as the paper). Both use questions only.",
            f"- ToxiGen: {r.get('toxigen_split', {}).get('eval', '')} (hate prompt seeds; "
            f"validation {r.get('toxigen_split', {}).get('val', '')}); fairness vector from "
            f"{r.get('toxigen_split', {}).get('fairness_vector', '')}; α rule: "
            f"{r.get('toxigen_split', {}).get('alpha_rule', '')}. A continuation is the greedy "
            "text up to its first line break (32 new tokens at most); an empty one counts as "
            "not toxic and is counted in `empty`.",
            f"- Perplexity: {r.get('perplexity_texts', '')}.",
        ]
    for s, t, _, r in pairs[1:]:
        st = r["settings"]
        tox = (
            f"{st['tox_eval']} evaluation / {st['tox_val']} validation prompts per group, "
            f"α grid {st['tox_alphas']}, fairness vector from {st['fair_per_group']} neutral "
            f"and {st['fair_per_group']} hate statements per group"
            if "toxigen" in r
            else "ToxiGen not run (see the command's script for why)"
        )
        lines.append(
            f"- {pair_name(s, t)}: TruthfulQA {st['tqa_eval']} evaluation / {st['tqa_val']} "
            f"validation questions, protocols {st['protocols']}, α grid {st['tqa_alphas']}; "
            f"{tox}; map sentences {st['n_map_texts']}."
        )
    lines += [
        "",
        "## TruthfulQA MC1 (paper Tables 1, 4, 6)",
        "",
        "Summed log-probability of each answer choice's tokens after the question (chat "
        "template for the instruct target, `Q: …\\nA:` for Gemma); MC1 = the true answer "
        "scores highest.",
        "",
    ]
    lines += tqa_table(pairs)
    lines += [
        "",
        "## ToxiGen toxic share, with perplexity (paper Table 2)",
        "",
    ]
    lines += tox_table(pairs)
    lines += ["", "## Honesty and fairness together (paper Table 7)", ""]
    lines += [
        "The clean honesty vector and the fairness vector, each at its own α, added together "
        "(rows *ConTrans, honesty + fairness* above).",
        "",
        "## Number of refinement examples (paper Fig. 5)",
        "",
    ]
    lines += refine_ablation()
    lines += ["## α sweeps (validation)", ""]
    lines += sweeps(pairs)
    lines += ["## Emotion transplant (issue 3, paper Fig. 2a)", ""]
    lines += emotion_summary()
    lines += ["## What moved inside the target (issue 5; `bash experiments/run_analysis.sh`)", ""]
    lines += analysis_section()
    lines += ["", *dapa_section(RESULTS / "dapa")]
    lines += ["", *recontrol_section(RESULTS / "recontrol")]
    lines += ["", *maps_section(RESULTS / "maps")]
    Path(args.out).write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {args.out}")


def dapa_section(folder: Path) -> list[str]:
    """DAPA against ConTrans on one aligned model and its harmful fine-tune (issue 15)."""
    head = [
        "## DAPA against ConTrans on one pair (issue 15; `python experiments/run_dapa.py`)",
        "",
        "Donor: Qwen2.5-Coder-0.5B-Instruct. Recipient: the donor fine-tuned on 100 AdvBench "
        "requests with their affirmative openings (`contrans_tl.finetune`, recipe and weight "
        "sha256 in `results/dapa/arm_recipient_dsr.json` inputs). Evaluated requests are "
        "disjoint from those (`contrans_tl.evals.refusal.split_advbench`).",
        "",
    ]
    if not folder.is_dir():
        return head + ["Not run."]
    from contrans_tl.pipelines.dapa import render_report

    return head + render_report(folder)


def recontrol_section(folder: Path) -> list[str]:
    """RE-Control next to ConTrans and best-of-N on Gemma-3-270m's ToxiGen prompts (issue 16)."""
    head = [
        "## RE-Control on ToxiGen (issue 16; `python experiments/run_recontrol.py`)",
        "",
        "Target Gemma-3-270m, the ToxiGen protocol above (130 evaluation prompts, 39 "
        "validation). The value function reads the final normalised state; its reward is "
        "1 − P(toxic) of the n-gram classifier (`contrans_tl.evals.ngram_toxicity`), which "
        "shares no features with the MiniLM judge. The control strength is chosen on the "
        "validation prompts by the reward model alone.",
        "",
    ]
    if not folder.is_dir():
        return head + ["Not run."]
    from contrans_tl.pipelines.recontrol import render_report

    return head + render_report(folder)


def maps_section(folder: Path) -> list[str]:
    """Map family × fitting text × layer choice, both pairs (issue 17): run_maps.py's table."""
    head = ["## Maps that carry the concept (issue 17; `python experiments/run_maps.py`)", ""]
    if not (folder / "maps.md").is_file():
        return head + ["Not run."]
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_maps", HERE / "run_maps.py")
    assert spec is not None and spec.loader is not None
    run_maps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_maps)
    run_maps.OUT = folder
    return head + run_maps.report().splitlines()[2:]  # its own title dropped


if __name__ == "__main__":
    main()
