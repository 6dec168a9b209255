"""What runs inside Ray Train's controller actor: callbacks on its reports and failures.

Free of TensorFlow: the controller (on the driver's node, often a small head) unpickles these, and the rest of
the pass's code would load TensorFlow there, hundreds of MB for nothing it does.
"""

from __future__ import annotations

import ray
from ray.train import UserCallback
from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.util.queue import Queue

from transfer.errors import TransferError


class PostEpochs(UserCallback):
    """Runs in the Ray Train controller: posts an epoch once its checkpoint is registered, so an epoch the driver
    prints is one that a restart resumes after."""

    def __init__(self, queue: Queue):
        self.queue = queue

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        self.queue.put({**metrics[0], "event": "epoch"})  # rank 0's: its metrics are global (MWMS reduces them)


class StopOnUserError(UserCallback):
    """Runs in the Ray Train controller: a worker that raised the user's own error (a bad record with
    `bad_records: fail`, a shard with no usable row) ends the run at once. The same data fails the same way on
    every retry, so restarting the worker group `max_failures` times would only delay the message."""

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        for error in worker_exceptions.values():
            cause = getattr(error, "cause", error)
            if isinstance(cause, TransferError):
                raise cause  # Ray Train does not retry a controller callback's error


class PostController(ControllerCallback):
    """Runs in the Ray Train controller: posts its own actor handle, so the driver can abort the run on a signal.
    The trainer creates the controller unnamed, inside fit(), which runs in a thread: Ray Train's own SIGINT
    handler (main thread only) is not installed, and the driver has no other way to reach it."""

    def __init__(self, queue: Queue):
        self.queue = queue

    def after_controller_start(self, train_run_context) -> None:
        self.queue.put({"event": "controller", "actor": ray.get_runtime_context().current_actor})
