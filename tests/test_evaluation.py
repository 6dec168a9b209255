"""The evaluation report's arithmetic, on a confusion matrix worked out by hand."""

import pytest

from transfer import evaluation


def test_report_of_a_known_confusion_matrix():
    # rows: true cat, dog, fox; columns: predicted
    confusion = [[8, 2, 0], [1, 9, 0], [0, 5, 5]]
    report = evaluation.report("head", ["cat", "dog", "fox"], confusion, top_k_hits=27)
    assert report["rows"] == 30 and report["accuracy"] == pytest.approx(22 / 30)
    assert report["k"] == 1 and report["top_k_accuracy"] == pytest.approx(27 / 30)
    dog = report["per_class"]["dog"]
    assert dog["precision"] == pytest.approx(9 / 16) and dog["recall"] == pytest.approx(9 / 10)
    assert dog["f1"] == pytest.approx(2 * (9 / 16) * (9 / 10) / (9 / 16 + 9 / 10)) and dog["support"] == 10
    assert report["per_class"]["fox"]["precision"] == 1.0
    assert report["most_confused"][0] == {"true": "fox", "predicted": "dog", "count": 5}
    assert [p["count"] for p in report["most_confused"]] == [5, 2, 1]


def test_a_class_never_predicted_has_zero_precision_not_an_error():
    report = evaluation.report("head", ["a", "b"], [[3, 0], [2, 0]], top_k_hits=3)
    assert report["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}


def test_summary_puts_the_worst_class_first_and_names_the_most_confused_pair():
    report = evaluation.report("finetune", ["cat", "dog", "fox"], [[8, 2, 0], [1, 9, 0], [0, 5, 5]], 27)
    lines = evaluation.summary_lines(report)
    assert lines[0].startswith("finetune: evaluated on 30 validation rows: accuracy 0.733, top-1 0.900")
    assert lines[1].startswith("  fox: f1 0.667") and lines[-1] == "  most confused: fox taken for dog 5 times"


def test_misclassified_rows_of_all_workers_are_the_20_most_confidently_wrong():
    rows = [{"where": f"w{i}", "true": "cat", "predicted": "dog", "probability": (i % 25) / 25} for i in range(50)]
    listed = evaluation.report("head", ["cat", "dog"], [[0, 50], [0, 0]], 50, misclassified=rows)["misclassified"]
    assert len(listed) == 20 and listed[0]["probability"] == 24 / 25
    assert [r["probability"] for r in listed] == sorted((r["probability"] for r in rows), reverse=True)[:20]


def test_top_k_is_5_beyond_5_classes():
    assert [evaluation.top_k(n) for n in (2, 3, 5, 6, 1000)] == [1, 1, 2, 5, 5]


def test_a_confusion_picture_of_many_classes_shows_those_with_the_most_errors():
    import numpy as np

    from transfer import pictures

    confusion = np.diag(np.full(80, 10))
    confusion[3, 70] = confusion[75, 5] = 4  # 3 taken for 70, 75 for 5
    shown = pictures.classes_shown(confusion)
    assert len(shown) == pictures.MOST_CLASSES and {3, 5, 70, 75} <= set(shown.tolist())
    assert list(shown) == sorted(shown) and list(pictures.classes_shown(np.eye(7))) == list(range(7))
