"""How good a pass's model is, per class: the evaluation report written beside each export.

The workers count (a confusion matrix and top-k hits over their validation rows, summed across workers); this
module, free of TensorFlow, turns the counts into `evaluation.json` and the lines the job prints.
"""

from __future__ import annotations

import numpy as np

FILE = "evaluation.json"
MOST_CONFUSED = 10  # pairs of classes listed
SUMMARY_CLASSES = 10  # classes printed at the end of a pass, worst first
MISCLASSIFIED = 20  # validation rows listed that the model got wrong, the most confidently wrong first


def top_k(num_classes: int) -> int:
    """The k of top-k accuracy: 5 when there are more than 5 classes, else half of them (1 for two)."""
    return 5 if num_classes > 5 else max(1, num_classes // 2)


def report(
    pass_name: str, classes: list[str], confusion: np.ndarray, top_k_hits: int, misclassified: list[dict] = ()
) -> dict:
    """The report of a confusion matrix (rows: true class, columns: predicted, in `classes` order).

    `misclassified`: rows the model got wrong ({where, true, predicted, probability}), from every worker.
    """
    confusion = np.asarray(confusion, np.int64)
    rows = int(confusion.sum())
    hits = np.diag(confusion)
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    precision = np.divide(hits, predicted, out=np.zeros(len(classes)), where=predicted > 0)
    recall = np.divide(hits, support, out=np.zeros(len(classes)), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros(len(classes)), where=both > 0)
    off_diagonal = confusion - np.diag(hits)
    pairs = sorted(
        ((int(off_diagonal[t, p]), t, p) for t, p in zip(*np.nonzero(off_diagonal), strict=True)), reverse=True
    )
    return {
        "pass": pass_name,
        "rows": rows,
        "accuracy": float(hits.sum() / rows) if rows else 0.0,
        "k": top_k(len(classes)),
        "top_k_accuracy": float(top_k_hits / rows) if rows else 0.0,
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "classes": classes,
        "confusion_matrix": confusion.tolist(),
        "most_confused": [
            {"true": classes[t], "predicted": classes[p], "count": n} for n, t, p in pairs[:MOST_CONFUSED]
        ],
        "misclassified": sorted(misclassified, key=lambda row: -row["probability"])[:MISCLASSIFIED],
    }


def summary_lines(evaluation: dict) -> list[str]:
    """The per-class lines a pass ends with: the worst classes by F1 first."""
    name = evaluation["pass"]
    per_class = sorted(evaluation["per_class"].items(), key=lambda item: (item[1]["f1"], item[0]))
    lines = [
        f"{name}: evaluated on {evaluation['rows']} validation rows: accuracy {evaluation['accuracy']:.3f}, "
        f"top-{evaluation['k']} {evaluation['top_k_accuracy']:.3f}; per class, worst first:"
    ]
    for cls, m in per_class[:SUMMARY_CLASSES]:
        lines.append(
            f"  {cls}: f1 {m['f1']:.3f} precision {m['precision']:.3f} recall {m['recall']:.3f} ({m['support']} rows)"
        )
    if len(per_class) > SUMMARY_CLASSES:
        lines.append(f"  ... {len(per_class) - SUMMARY_CLASSES} more in {FILE}")
    if evaluation["most_confused"]:
        worst = evaluation["most_confused"][0]
        lines.append(f"  most confused: {worst['true']} taken for {worst['predicted']} {worst['count']} times")
    return lines
