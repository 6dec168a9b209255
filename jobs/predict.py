"""transfer-predict --model EXPORT --data DATA --out OUT [--format parquet|images] [--image-column C]
[--batch-size N] [--workers N] [--cpus-per-worker N] [--use-gpu]

Exit codes as transfer-train's: 0 success; 2 usage error; 3 data error found before predicting; 1 failure.
The last line on stdout is a JSON summary (rows, errors, seconds, out) a DAG task can parse.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

from jobs.train import fail


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="transfer-predict",
        description="Label every image of a dataset with an exported classifier, on Ray Data; writes Parquet.",
    )
    parser.add_argument("--model", required=True, help="an export folder (<run>/export/<pass>), local or URI")
    parser.add_argument(
        "--data",
        required=True,
        help="Parquet file, folder or glob; or with --format images a folder of images or a CSV/Parquet manifest",
    )
    parser.add_argument("--out", required=True, help="the folder the predictions go to (replaced whole)")
    parser.add_argument("--format", choices=("parquet", "images"), default="parquet")
    parser.add_argument("--image-column", help="the column holding images or their URIs (default: the export's)")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per model call (default 64)")
    parser.add_argument("--workers", type=int, default=1, help="actors, each with its own copy of the model")
    parser.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs each actor decodes with (default 1)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per actor")
    parser.add_argument("--verbose", action="store_true", help="show TensorFlow's and Ray's own logs")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transfer import storage
    from transfer.errors import Interrupted, TransferError
    from transfer.predict import Request, run_prediction

    attempt = {"model": storage.redact(args.model), "out": storage.redact(args.out)}
    request = Request(
        model=args.model,
        data=args.data,
        out=args.out,
        format=args.format,
        image_column=args.image_column,
        batch_size=args.batch_size,
        workers=args.workers,
        use_gpu=args.use_gpu,
        cpus_per_worker=args.cpus_per_worker,
    )
    try:
        summary = run_prediction(request, verbose=args.verbose)
    except KeyboardInterrupt:
        stopped = Interrupted(signal.SIGINT)
        return fail(args, stopped, stopped.exit_code, attempt, status="interrupted")
    except TransferError as e:
        return fail(args, e, e.exit_code, attempt)
    except Exception as e:
        return fail(args, e, 1, attempt, prefix="prediction failed: ")
    print(f"predict: {summary['rows']} rows, {summary['errors']} without a prediction, at {summary['out']}")
    print(json.dumps({"status": "succeeded", **summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
