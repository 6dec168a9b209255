"""The export's pictures: the confusion matrix and the learning curves, as PNG files people look at first.

Drawn with matplotlib's object API (no pyplot, no display, no global state), on the driver, after training.
"""

from __future__ import annotations

import numpy as np

CONFUSION = "confusion_matrix.png"
CURVES = "learning_curves.png"
MOST_CLASSES = 50  # legible on one picture; beyond it, the classes with the most errors


def confusion_matrix_png(evaluation: dict, path: str) -> None:
    """Row-normalised (each true class sums to 1), class names on both axes."""
    from matplotlib.figure import Figure

    classes, confusion = evaluation["classes"], np.asarray(evaluation["confusion_matrix"], float)
    shown = classes_shown(confusion)
    title = f"{evaluation['pass']}: {evaluation['rows']} validation rows, accuracy {evaluation['accuracy']:.3f}"
    if len(shown) < len(classes):
        title += f"; the {len(shown)} of {len(classes)} classes with the most errors"
    support = confusion.sum(axis=1, keepdims=True)
    rates = np.divide(confusion, support, out=np.zeros_like(confusion), where=support > 0)[np.ix_(shown, shown)]
    names = [classes[i] for i in shown]

    side = max(4.0, 0.28 * len(names) + 2.5)
    figure = Figure(figsize=(side + 1.2, side), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, shrink=0.8, label="share of the true class")
    axes.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
    axes.set_yticks(range(len(names)), names, fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title, fontsize=9)
    if len(names) <= 20:  # room for the numbers in the cells
        for t, p in np.ndindex(rates.shape):
            if rates[t, p] > 0:
                colour = "white" if rates[t, p] > 0.5 else "black"
                axes.text(p, t, f"{rates[t, p]:.2f}", ha="center", va="center", fontsize=7, color=colour)
    figure.savefig(path, dpi=100)


def classes_shown(confusion: np.ndarray) -> np.ndarray:
    """Every class, up to MOST_CLASSES; beyond, those most often mistaken or mistaken for (in label order)."""
    if len(confusion) <= MOST_CLASSES:
        return np.arange(len(confusion))
    errors = confusion.sum(axis=0) + confusion.sum(axis=1) - 2 * np.diag(confusion)
    return np.sort(np.argsort(-errors, kind="stable")[:MOST_CLASSES])


def learning_curves_png(histories: list[tuple[str, list[dict]]], path: str) -> None:
    """Loss and accuracy per epoch, training and validation, for each pass in turn (the fine-tune export's
    picture shows the head pass first)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(10, 4), layout="constrained")
    loss, accuracy = figure.subplots(1, 2)
    epoch = 0
    for pass_name, history in histories:
        epochs = [epoch + row["epoch"] for row in history]
        for axes, key in ((loss, "loss"), (accuracy, "accuracy")):
            axes.plot(epochs, [row[key] for row in history], "o-", label=f"{pass_name} train")
            axes.plot(epochs, [row[f"val_{key}"] for row in history], "s--", label=f"{pass_name} validation")
        if epoch:
            for axes in (loss, accuracy):
                axes.axvline(epoch + 0.5, color="grey", linewidth=0.8)
        epoch = epochs[-1] if epochs else epoch
    for axes, name in ((loss, "loss"), (accuracy, "accuracy")):
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_title(name)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.savefig(path, dpi=100)
