"""Benchmark data made once per machine: written in a staging folder, then renamed into place, so an interrupted
run leaves no half-made cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from transfer.demo import cache_root  # numpy and pyarrow only: a benchmark's parent process never loads TensorFlow


def cache_folder(name: str, override: str | None = None) -> str:
    """A benchmark's data folder: `override` (its --cache-dir), else <TRANSFER_CACHE_DIR or ~/.cache/transfer>/NAME."""
    return override or os.path.join(cache_root(), name)


def in_fresh_process(script: str, spec: dict, env: dict[str, str], timeout: float) -> dict:
    """Runs `script --worker SPEC` in a fresh Python; its last JSON line, or {"error": why} when it failed."""
    try:
        out = subprocess.run(
            [sys.executable, os.path.abspath(script), "--worker", json.dumps(spec)],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in out.stdout.strip().splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"error": f"exit {out.returncode}: {out.stderr.strip()[-1500:]}"}
    return json.loads(lines[-1])


def made_once(cache: str, name: str, make: Callable[[str], dict]) -> dict:
    """`<cache>/<name>/`: `make(folder)` writes the data into `folder/data/` and returns what it holds, kept as
    `info.json` beside it. Returns that description, with `path` (the data folder) and `made_in_s`."""
    directory = os.path.join(cache, name)
    info_path = os.path.join(directory, "info.json")
    if not os.path.exists(info_path):
        print(f"making {name} in {directory} (once)", flush=True)
        os.makedirs(cache, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".staging-", dir=cache)
        try:
            start = time.time()
            info = make(staging)
            with open(os.path.join(staging, "info.json"), "w") as f:
                json.dump({**info, "made_in_s": time.time() - start}, f, indent=1)
            shutil.rmtree(directory, ignore_errors=True)
            os.rename(staging, directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    with open(info_path) as f:
        return {**json.load(f), "path": os.path.join(directory, "data")}
