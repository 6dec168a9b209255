"""A head search of N configurations against N separate head-pass runs of the same configurations.

    python benchmarks/search.py --out benchmarks/results/search.json [--trials 16]

Contenders, on the demo's data and backbone (3,000 JPEGs, demo_cnn pretrained offline, 2 workers), each run a
fresh `python -m jobs.train` process timed from its start to its exit, all joining one local Ray head that the
benchmark starts (as runs on a cluster join its head):
  search     one head pass with `head.search.trials=N`: the configured head, then N Ray Tune trials on the
             features that pass persisted (ASHA stops poor trials early); the backbone runs once
  separate   N head passes, one per configuration the search drew (its learning rate, dropout and epochs),
             each a run of its own: each runs the backbone over every image again
The search draws class_weight `none` only: a separate run has no class weighting to set. Reported: the wall
seconds of each contender (the separate runs' sum and median), the best validation accuracy each found, how
often each ran the backbone and for how long, and the ratio of the walls.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from transfer import demo  # noqa: E402  (numpy and pyarrow only: this process never loads TensorFlow)
from transfer.job import answers  # noqa: E402

# rank 0's line, one per split: "head: backbone features of N [validation ]images per worker computed in S s, ..."
COMPUTED = re.compile(r"^head: backbone features of \d+ (?:validation )?images per worker computed in ([0-9.]+) s",
                      re.M)  # fmt: skip
SEARCHED = re.compile(r"^head search: \d+ trials in ([0-9.]+) s", re.M)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where the JSON results go")
    parser.add_argument("--trials", type=int, default=16)
    args = parser.parse_args()
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # everything on 127.0.0.1
    # Token authentication, the head and every run with Ray's default token (~/.ray/auth_token), as Ray 2.60
    # does for a local cluster: a run joining a head started with a token must be told to send it.
    os.environ["RAY_AUTH_MODE"] = "token"
    assets = demo.prepare()
    work = tempfile.mkdtemp(prefix="bench-search-")
    config = os.path.join(work, "job.yaml")
    cfg = demo.demo_config(assets)
    cfg["run"].update(storage=os.path.join(work, "runs"), progress_every_s=600)
    with open(config, "w") as f:
        yaml.safe_dump(cfg, f)
    address, stop = start_ray_head()
    try:
        search = train(config, address, "search", f"head.search.trials={args.trials}",
                       "head.search.class_weight=[none]")  # fmt: skip
        trials = json.loads(open(os.path.join(work, "runs", "search", "export", "head", "search.json")).read())
        separate = []
        for k, trial in enumerate(t for t in trials if t["trial"] != "configured"):
            p = trial["params"]
            print(f"separate run {k + 1}/{args.trials}: {p}", flush=True)
            run = train(config, address, f"separate-{k}", f"head.learning_rate={p['learning_rate']}",
                        f"model.dropout={p['dropout']}", f"head.epochs={p['epochs']}")  # fmt: skip
            separate.append({**run, "params": p, "search_val_accuracy": trial["val_accuracy"]})
    finally:
        stop()
        shutil.rmtree(work, ignore_errors=True)
    results = report(search, trials, separate)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results["summary"], indent=1))


def train(config: str, address: str, name: str, *overrides: str) -> dict:
    """One head pass in a fresh process: its wall seconds, final val_accuracy, backbone and search seconds."""
    sets = [arg for override in (f"run.name={name}", *overrides) for arg in ("--set", override)]
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "jobs.train", config, "--pass", "head", *sets],
        cwd=REPO,
        env={**os.environ, "RAY_ADDRESS": address},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    wall = time.monotonic() - start
    if out.returncode != 0:
        raise SystemExit(f"{name}: exit {out.returncode}\n{out.stderr[-3000:]}")
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    searched = SEARCHED.search(out.stdout)
    return {
        "wall_s": wall,
        "val_accuracy": summary["passes"]["head"]["final"]["val_accuracy"],
        "backbone_passes": len(COMPUTED.findall(out.stdout)),  # per split: 2 when the backbone ran over all
        "backbone_s": sum(float(s) for s in COMPUTED.findall(out.stdout)),
        "search_s": float(searched.group(1)) if searched else None,
    }


def report(search: dict, trials: list[dict], separate: list[dict]) -> dict:
    walls = [run["wall_s"] for run in separate]
    best = max(separate, key=lambda run: run["val_accuracy"])
    summary = {
        "trials": len(separate),
        "search_wall_s": round(search["wall_s"], 1),
        "search_trials_s": search["search_s"],
        "search_best_val_accuracy": max(t["val_accuracy"] for t in trials),
        "search_chosen": next(t["trial"] for t in trials if t["chosen"]),
        "search_backbone_runs": search["backbone_passes"] // 2,
        "separate_wall_s_sum": round(sum(walls), 1),
        "separate_wall_s_median": round(statistics.median(walls), 1),
        "separate_best_val_accuracy": best["val_accuracy"],
        "separate_backbone_runs": sum(run["backbone_passes"] for run in separate) // 2,
        "separate_backbone_s_median": round(statistics.median(run["backbone_s"] for run in separate), 2),
        "trials_stopped_early": sum(t["stopped_early"] for t in trials),
        "separate_over_search_wall": round(sum(walls) / search["wall_s"], 2),
    }
    return {
        "summary": summary,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "search": search,
        "trials": trials,
        "separate": separate,
        "notes": {
            "data": "the demo's 3,000 JPEGs of 64 px (2,400 train, 600 validation), demo_cnn pretrained offline",
            "wall_s": "one fresh `python -m jobs.train --pass head` process, start to exit, joining a running Ray",
            "backbone": "backbone_s: rank 0's 'backbone features ... computed in S s' lines, both splits",
        },
    }


def start_ray_head() -> tuple[str, Callable[[], None]]:
    """A Ray head on 127.0.0.1 (2 CPUs) that every run joins; its address and a function that stops it (its
    processes only: any other Ray on this machine is left alone)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    args = [ray, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus",
            "2", "--include-dashboard", "false", "--temp-dir", temp_dir, "--disable-usage-stats"]  # fmt: skip
    head = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not answers(f"127.0.0.1:{port}"):
        if head.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the benchmark's Ray head did not start (exit {head.poll()})")
        time.sleep(1)

    def stop() -> None:
        os.killpg(head.pid, signal.SIGTERM)  # the head and every process it started
        head.wait(60)
        shutil.rmtree(temp_dir, ignore_errors=True)

    return f"127.0.0.1:{port}", stop


if __name__ == "__main__":
    main()
