"""Datasets of the local lm-eval tasks: read from the shared data folder, never the hub."""

from typing import Any


def truthfulqa_mc(**_: Any) -> Any:
    """TruthfulQA's 817 questions (``mc_task.json``) as a ``validation`` split, in file
    order, in the upstream ``truthful_qa/multiple_choice`` layout plus ``mc1_correct``."""
    import datasets

    from contrans_tl.evals.truthfulqa import load_truthfulqa

    rows = [
        {
            "question": q.question,
            "mc1_targets": {
                "choices": q.mc1_choices,
                "labels": [int(i == q.mc1_correct) for i in range(len(q.mc1_choices))],
            },
            "mc2_targets": {"choices": q.mc2_choices, "labels": q.mc2_labels},
            "mc1_correct": q.mc1_correct,
        }
        for q in load_truthfulqa()
    ]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})
