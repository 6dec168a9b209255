"""What the driver sends every worker (and Ray Train's controller) for one pass.

Free of TensorFlow: Ray Train's controller (on the driver's node, often a small head) unpickles it with the
trainer's config, and the train loop's module would load TensorFlow there, hundreds of MB for nothing it does.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from transfer.config import Config, from_dict
from transfer.data.plan import DatasetPlan


@dataclass(frozen=True)
class PassSpec:
    """Everything a worker needs for one pass; sent by the driver as the train loop's config."""

    config: dict
    pass_name: str  # head | finetune
    plans: dict[int, DatasetPlan]  # by number of workers: one, or one per world size an elastic pass may get
    init_model: str | None  # finetune: the model.keras to start from
    progress: Any = None  # a ray.util.queue.Queue the driver prints from; every worker posts when it starts
    world_size: int | None = None  # set on the workers, to the size of the worker group they are in
    progress_every_s: float = 30.0  # how often rank 0 posts a long phase's progress: run.progress_every_s, or
    # every second when the driver shows it as a bar on a terminal

    @property
    def plan(self) -> DatasetPlan:
        """The plan for this worker group's size (on the driver, the largest's: the classes are the same)."""
        return self.plans[self.world_size or max(self.plans)]

    @cached_property
    def cfg(self) -> Config:
        return from_dict(self.config)

    @property
    def epochs(self) -> int:
        return self.cfg.pass_settings(self.pass_name).epochs

    @property
    def learning_rate(self) -> float:
        return self.cfg.pass_settings(self.pass_name).learning_rate

    @property
    def batch_size(self) -> int:
        return self.cfg.pass_settings(self.pass_name).batch_size
