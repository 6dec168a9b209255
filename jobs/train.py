"""transfer-train [CONFIG.yaml] [--pass head|finetune|all] [--set key.path=value ...]

Exit codes: 0 success; 2 config or usage error; 3 data error found before training; 1 training failure;
143 stopped by SIGTERM, 130 by SIGINT (the workers stopped, the checkpoints kept: a rerun resumes).
The last line on stdout is a JSON summary a DAG task can parse.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import traceback


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="transfer-train",
        description="Train an image classifier on a frozen pretrained backbone, then fine-tune it, on Ray.",
    )
    parser.add_argument("config", nargs="?", help="job config (YAML); without one, runs the built-in demo")
    parser.add_argument("--pass", dest="passes", choices=("head", "finetune", "all"), default="all")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a key"
    )
    parser.add_argument("--verbose", action="store_true", help="show TensorFlow's and Ray's own logs")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transfer import demo
    from transfer.config import load_config
    from transfer.errors import Interrupted, TransferError
    from transfer.job import import_tensorflow, run_job

    attempt: dict = {"pass": args.passes}  # what a failure's summary line can say of the run
    try:
        base = None
        if not args.config:  # the demo: its assets are made with TensorFlow
            import_tensorflow(args.verbose)
            base = demo.demo_config(demo.prepare())
        cfg = load_config(args.config, args.overrides, base=base)
        attempt["run"] = cfg.run.name
        passes = ["head", "finetune"] if args.passes == "all" else [args.passes]
        summary = run_job(cfg, passes, verbose=args.verbose)
    except KeyboardInterrupt:  # Ctrl-C outside a pass (a pass turns SIGINT into Interrupted itself)
        stopped = Interrupted(signal.SIGINT)
        return fail(args, stopped, stopped.exit_code, attempt, status="interrupted")
    except Interrupted as e:
        return fail(args, e, e.exit_code, attempt, status="interrupted")
    except TransferError as e:
        return fail(args, e, e.exit_code, attempt)
    except Exception as e:
        return fail(args, e, 1, attempt, prefix="training failed: ")
    for name, result in summary["passes"].items():
        print(f"{name}: val_accuracy {result['final']['val_accuracy']:.3f}, export at {result['export']}")
    print(json.dumps({"status": "succeeded", **summary}), flush=True)
    return 0


def fail(
    args: argparse.Namespace, error: Exception, exit_code: int, attempt: dict, prefix: str = "", status: str = "failed"
) -> int:
    """One line on stderr (the traceback too with --debug), and the JSON summary line on stdout."""
    if args.debug:
        traceback.print_exc()
    lines = str(error).strip().splitlines() or [type(error).__name__]
    message = f"{prefix}{lines[0]}"
    print(f"error: {message}", file=sys.stderr)
    print(json.dumps({"status": status, **attempt, "exit_code": exit_code, "error": message}), flush=True)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
