"""The final model of a pass in shared storage: written whole, then marked complete by its manifest.

`export/<pass>/` holds model.keras, saved_model/ (for serving), labels.json, config.yaml, metrics.json and,
written last, manifest.json with every file's size and sha256. Without a manifest an export is incomplete.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from typing import TYPE_CHECKING

from transfer import evaluation, pictures, storage
from transfer.errors import DataError

if TYPE_CHECKING:
    import tensorflow as tf

MANIFEST = "manifest.json"
MODEL = "model.keras"
SEARCH = "search.json"  # a head export chosen by a head search: every trial (transfer.search)


def write_export(
    model: tf.keras.Model,
    classes: list[str],
    config_yaml: str,
    metrics: dict,
    location: str,
    report: dict | None = None,
    curves: list[tuple[str, list[dict]]] | None = None,
    search: list[dict] | None = None,
) -> None:
    """Writes the export to `location`, replacing any earlier one; a crash midway leaves no manifest.

    `report`: the pass's evaluation (transfer.evaluation), as evaluation.json and confusion_matrix.png;
    `curves`: (pass, history) of this pass and the ones it continues, as learning_curves.png; `search`: the
    trials of a head search, as search.json.
    """
    with tempfile.TemporaryDirectory(prefix="transfer-export-") as local:
        model.save(os.path.join(local, MODEL))
        with contextlib.redirect_stdout(io.StringIO()):  # Keras prints every endpoint's signature
            model.export(os.path.join(local, "saved_model"))
        _write_json(os.path.join(local, "labels.json"), classes)
        _write_json(os.path.join(local, "metrics.json"), metrics)
        if report is not None:
            _write_json(os.path.join(local, evaluation.FILE), report)
            pictures.confusion_matrix_png(report, os.path.join(local, pictures.CONFUSION))
        if curves:
            pictures.learning_curves_png(curves, os.path.join(local, pictures.CURVES))
        if search is not None:
            _write_json(os.path.join(local, SEARCH), search)
        with open(os.path.join(local, "config.yaml"), "w") as f:
            f.write(config_yaml)
        manifest = {"files": _describe(local)}
        storage.delete(storage.join(location, MANIFEST))  # from here on, the old export is no longer complete
        storage.delete(location)
        storage.upload_dir(local, location)
    storage.write_text_whole(storage.join(location, MANIFEST), json.dumps(manifest, indent=1))


def is_complete(location: str) -> bool:
    return storage.exists(storage.join(location, MANIFEST))


def check_complete(location: str, key: str = "export") -> None:
    """Refuses an export without a manifest, or whose files are missing or differ from it (size, sha256)."""
    shown = storage.redact(location)
    if not is_complete(location):
        raise DataError(f"{key}: {shown} is not a complete export (no {MANIFEST}); run the pass that writes it")
    manifest = json.loads(storage.read_text(storage.join(location, MANIFEST)))
    fs, root = storage.resolve(location)
    for name, entry in sorted(manifest["files"].items()):
        path = f"{root.rstrip('/')}/{name}"
        info = fs.get_file_info(path)
        if info.size is None:
            raise DataError(f"{key}: {shown}/{name} is missing; the export is incomplete")
        if info.size != entry["size"]:
            raise DataError(f"{key}: {shown}/{name} has {info.size} bytes, its manifest says {entry['size']}")
        digest = hashlib.sha256()
        with fs.open_input_stream(path) as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != entry["sha256"]:
            raise DataError(f"{key}: {shown}/{name} differs from its manifest (sha256): the export was altered")


def load_model(location: str) -> tf.keras.Model:
    """Loads an export's model.keras after checking it against its manifest; never runs code from it."""
    import tensorflow as tf

    check_complete(location)
    with storage.local_copy(storage.join(location, MODEL)) as path:
        return tf.keras.models.load_model(path, safe_mode=True)


def read_metrics(location: str) -> dict:
    return json.loads(storage.read_text(storage.join(location, "metrics.json")))


def _describe(directory: str) -> dict[str, dict]:
    files = {}
    for parent, _, names in os.walk(directory):
        for name in sorted(names):
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            files[os.path.relpath(path, directory)] = {"size": os.path.getsize(path), "sha256": digest}
    return files


def _write_json(path: str, value: object) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=1)
