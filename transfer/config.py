"""The job's configuration: one typed, validated object built from YAML plus `--set` overrides.

Every section is a frozen dataclass; the YAML keys are the field names. Unknown keys, wrong types and
impossible values raise ConfigError naming the key, before any expensive work starts.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from transfer import storage
from transfer.errors import ConfigError

# The names of transfer.backbones.BACKBONES, repeated so that validating a config does not import TensorFlow.
BACKBONES = (
    "vgg16",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "efficientnet_v2_b0",
    "convnext_tiny",
    "demo_cnn",
)
AUGMENTATIONS = ("flip", "crop", "rotation", "contrast")


@dataclass(frozen=True)
class Run:
    name: str = "demo"
    storage: str = "runs"  # local path or URI; <storage>/<name>/ holds checkpoints and exports
    checkpoints_to_keep: int = 2
    progress_every_s: float = 30.0  # a line on how far a long phase (features, an epoch) is, this often
    mlflow_tracking_uri: str | None = None  # MLflow tracking (transfer.tracking); needs the `mlflow` extra


@dataclass(frozen=True)
class Data:
    train: str = ""
    format: str = "parquet"  # parquet | images (a folder <root>/<class>/<file>, or a CSV/Parquet manifest)
    validation: str | None = None
    validation_split: float = 0.1
    image_column: str = "image"
    label_column: str = "label"
    image_size: tuple[int, int] = (224, 224)
    bad_records: str = "skip"
    seed: int = 0  # the validation split and the shard plan are deterministic for a seed
    shuffle_buffer: int = 1024
    augment: tuple[str, ...] = ()  # any of flip, crop, rotation, contrast; training images only
    decode_threads: int | None = None  # images decoded at once per worker; default scaling.cpus_per_worker
    row_groups_in_flight: int | None = None  # row groups open at once per worker, interleaved; default 32
    fetches_in_flight: int | None = None  # image objects requested at once per worker; default 64
    read_buffer_mb: int = 256  # per worker: what the row groups open at once may hold (two open at least)
    validation_cache_mb: int = 2048  # per worker: decoded validation images kept in memory; beyond, on local disk


@dataclass(frozen=True)
class Model:
    backbone: str = "vgg16"
    weights: str = "imagenet"  # imagenet | none | a file path or URI (.h5 weights of the backbone)
    dropout: float = 0.2


@dataclass(frozen=True)
class HeadSearch:
    """Heads tried on the persisted features, each a Ray Tune trial; the best by val_accuracy is the export."""

    trials: int = 0  # 0: no search
    method: str = "random"  # random: each trial draws from the ranges and choices | grid: every combination
    learning_rate: tuple[float, ...] = (1e-4, 1e-2)  # random: log-uniform in [low, high]; grid: the values
    dropout: tuple[float, ...] = (0.0, 0.5)  # random: uniform in [low, high]; grid: the values
    epochs: tuple[int, ...] = (5, 10, 20)  # the choices; ASHA stops a poor trial early
    class_weight: tuple[str, ...] = ("none", "balanced")  # balanced: each class weighs as much in the loss
    cpus_per_trial: int = 1

    PARAMS = ("learning_rate", "dropout", "epochs", "class_weight")  # what a trial draws (not a field)

    def trial_count(self) -> int:
        """How many trials the search runs: `trials` draws, or every combination of the grid."""
        if self.method == "random":
            return self.trials
        return math.prod(len(getattr(self, name)) for name in self.PARAMS)


@dataclass(frozen=True)
class Head:
    epochs: int = 10
    learning_rate: float = 1e-3
    batch_size: int = 32  # per worker; the global batch is batch_size * num_workers
    cache_features: str = "auto"  # auto: on unless data.augment is set
    feature_cache_mb: int = 2048  # per worker; larger caches spill to local disk
    search: HeadSearch = field(default_factory=HeadSearch)


@dataclass(frozen=True)
class Finetune:
    epochs: int = 5
    learning_rate: float = 1e-5
    unfreeze: int | str = 20  # layers from the top of the backbone, a layer name, or "all"
    init_from: str | None = None  # defaults to <run>/export/head/
    batch_size: int | None = None  # defaults to head.batch_size


@dataclass(frozen=True)
class Scaling:
    num_workers: int | tuple[int, int] = 2  # or [min, max]: elastic, as many as the cluster fits (README)
    use_gpu: bool = False
    cpus_per_worker: int = 1
    max_failures: int = 2
    collective_timeout_s: int = 300  # a lost peer inside a collective ends in an error after this
    mixed_precision: str = "auto"  # auto (float16 on GPU, off on CPU) | float16 | bfloat16 | off
    jit_compile: bool = False  # XLA

    @property
    def world_sizes(self) -> range:
        """Every number of workers a pass may run on: one, or min..max when elastic."""
        low, high = (self.num_workers, self.num_workers) if isinstance(self.num_workers, int) else self.num_workers
        return range(low, high + 1)


@dataclass(frozen=True)
class PassSettings:
    epochs: int
    learning_rate: float
    batch_size: int


@dataclass(frozen=True)
class Config:
    run: Run = field(default_factory=Run)
    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)
    head: Head = field(default_factory=Head)
    finetune: Finetune = field(default_factory=Finetune)
    scaling: Scaling = field(default_factory=Scaling)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        """The resolved config as saved next to checkpoints and exports, with credentials in URIs hidden."""
        return yaml.safe_dump(_redacted(self.to_dict()), sort_keys=False)

    def pass_settings(self, pass_name: str) -> PassSettings:
        """Epochs, learning rate and per-worker batch size of the head or the fine-tune pass."""
        if pass_name == "head":
            return PassSettings(self.head.epochs, self.head.learning_rate, self.head.batch_size)
        f = self.finetune
        return PassSettings(f.epochs, f.learning_rate, f.batch_size or self.head.batch_size)

    @property
    def caches_features(self) -> bool:
        """Whether the head pass trains on backbone features computed once (they only change with augmentation)."""
        return self.head.cache_features == "on" or (self.head.cache_features == "auto" and not self.data.augment)

    @property
    def precision_policy(self) -> str | None:
        """The Keras mixed-precision policy for the workers, or None for float32."""
        choice = self.scaling.mixed_precision
        if choice == "auto":
            return "mixed_float16" if self.scaling.use_gpu else None
        return None if choice == "off" else f"mixed_{choice}"

    @property
    def run_uri(self) -> str:
        """Where this run's checkpoints and exports live: <run.storage>/<run.name>."""
        return f"{self.run.storage.rstrip('/')}/{self.run.name}"


def _redacted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    return storage.redact(value) if isinstance(value, str) else value


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_to_plain(v) for v in value]
    return value


def load_config(path: str | None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Reads a YAML config (or starts from `base`), applies `key.path=value` overrides, validates."""
    source = path or "config"
    raw: dict = dict(base or {})
    if path is not None:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}:{where} not valid YAML: {getattr(e, 'problem', e)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the config must be a mapping of sections (run, data, model, ...)")
    for item in overrides:
        apply_override(raw, item)
    return with_absolute_paths(from_dict(raw, source))


def with_absolute_paths(c: Config) -> Config:
    """Local paths made absolute, so Ray workers (in other folders) and the saved config mean the same files."""

    def fix(location: str | None) -> str | None:
        return location if location is None or location in ("imagenet", "none") else storage.absolute(location)

    replace = dataclasses.replace
    return replace(
        c,
        run=replace(c.run, storage=fix(c.run.storage)),
        data=replace(c.data, train=fix(c.data.train), validation=fix(c.data.validation)),
        model=replace(c.model, weights=fix(c.model.weights)),
        finetune=replace(c.finetune, init_from=fix(c.finetune.init_from)),
    )


def apply_override(raw: dict, item: str) -> None:
    """Applies one `--set key.path=value` (the value is parsed as YAML) to the raw config."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item}: expected key.path=value")
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item}: {part} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"--set {item}: value is not valid YAML") from None


def from_dict(raw: dict, source: str = "config") -> Config:
    config = _build(Config, raw, source, "")
    _check_values(config, source)
    return config


def _build(cls: type, raw: Any, source: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'}: expected a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{source}: {prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    values = {}
    for name, value in raw.items():
        key = f"{prefix}{name}"
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value if value is not None else {}, source, f"{key}.")
        else:
            values[name] = _coerce(value, hint, source, key)
    return cls(**values)


def _coerce(value: Any, hint: Any, source: str, key: str) -> Any:
    """Checks `value` against a field's type hint; ints are accepted where floats are expected."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return None
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if option is float and isinstance(value, str) and _is_number(value):
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        if option is str and isinstance(value, str):
            return value
        if typing.get_origin(option) is tuple and isinstance(value, list | tuple):
            args = typing.get_args(option)
            if args[-1] is Ellipsis:
                return tuple(_coerce(v, args[0], source, f"{key}[{i}]") for i, v in enumerate(value))
            if len(value) == len(args) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                return tuple(value)
    expected = " or ".join(_type_name(o) for o in options)
    raise ConfigError(f"{source}: {key}: expected {expected}, got {value!r}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        return f"a list of {args[0].__name__}" if args[-1] is Ellipsis else f"a list of {len(args)} integers"
    return hint.__name__


def _check_search(s: HeadSearch, caches_features: bool, fail: Callable[[str, str], None]) -> None:
    key = "head.search"
    if s.trials < 0:
        fail(f"{key}.trials", f"must be >= 0, got {s.trials}")
    if not s.trials:
        return
    if not caches_features:
        fail(key, "trains heads on the persisted backbone features: it needs head.cache_features auto or on, "
             "without data.augment")  # fmt: skip
    if s.method not in ("random", "grid"):
        fail(f"{key}.method", f"must be one of random, grid, got {s.method!r}")
    for name in s.PARAMS:
        if not getattr(s, name):
            fail(f"{key}.{name}", "must list at least one value")
    if s.method == "random":
        for name in ("learning_rate", "dropout"):
            values = getattr(s, name)
            if len(values) != 2 or values[0] > values[1]:
                fail(f"{key}.{name}", f"with method random, the range [low, high]; got {list(values)}")
    if min(s.learning_rate) <= 0:
        fail(f"{key}.learning_rate", f"must be > 0, got {list(s.learning_rate)}")
    if not all(0.0 <= d < 1.0 for d in s.dropout):
        fail(f"{key}.dropout", f"must be in [0, 1), got {list(s.dropout)}")
    if min(s.epochs) < 1:
        fail(f"{key}.epochs", f"must be >= 1, got {list(s.epochs)}")
    for weighting in s.class_weight:
        if weighting not in ("none", "balanced"):
            fail(f"{key}.class_weight", f"must be none or balanced, got {weighting!r}")
    if s.cpus_per_trial < 1:
        fail(f"{key}.cpus_per_trial", f"must be >= 1, got {s.cpus_per_trial}")
    if s.method == "grid" and s.trial_count() > s.trials:
        fail(f"{key}.trials", f"the grid has {s.trial_count()} combinations, more than the {s.trials} trials")


def _check_values(c: Config, source: str) -> None:
    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{source}: {key}: {message}")

    def one_of(key: str, value: str, allowed: tuple) -> None:
        if value not in allowed:
            fail(key, f"must be one of {', '.join(allowed)}, got {value!r}")

    def at_least(key: str, value: float, low: float) -> None:
        if value < low:
            fail(key, f"must be >= {low}, got {value}")

    if not c.run.name or "/" in c.run.name:
        fail("run.name", f"must be a non-empty name without '/', got {c.run.name!r}")
    if not c.run.storage:
        fail("run.storage", "must be a local path or a URI")
    at_least("run.checkpoints_to_keep", c.run.checkpoints_to_keep, 1)
    at_least("run.progress_every_s", c.run.progress_every_s, 0)
    if not c.data.train:
        fail("data.train", "required: a Parquet file, folder or glob")
    one_of("data.format", c.data.format, ("parquet", "images"))
    if not 0.0 <= c.data.validation_split < 1.0:
        fail("data.validation_split", f"must be in [0, 1), got {c.data.validation_split}")
    if c.data.validation is None and c.data.validation_split == 0.0:
        fail("data.validation_split", "must be > 0 when data.validation is not set")
    if min(c.data.image_size) < 32:
        fail("data.image_size", f"both sides must be >= 32, got {list(c.data.image_size)}")
    one_of("data.bad_records", c.data.bad_records, ("skip", "fail"))
    at_least("data.shuffle_buffer", c.data.shuffle_buffer, 1)
    for key in ("decode_threads", "row_groups_in_flight", "fetches_in_flight"):
        if getattr(c.data, key) is not None:
            at_least(f"data.{key}", getattr(c.data, key), 1)
    at_least("data.validation_cache_mb", c.data.validation_cache_mb, 0)
    at_least("data.read_buffer_mb", c.data.read_buffer_mb, 1)
    one_of("model.backbone", c.model.backbone, BACKBONES)
    if not c.model.weights:
        fail("model.weights", "must be imagenet, none, or a file path or URI")
    if not 0.0 <= c.model.dropout < 1.0:
        fail("model.dropout", f"must be in [0, 1), got {c.model.dropout}")
    for section in ("head", "finetune"):
        s = getattr(c, section)
        at_least(f"{section}.epochs", s.epochs, 1)
        if s.learning_rate <= 0:
            fail(f"{section}.learning_rate", f"must be > 0, got {s.learning_rate}")
        if s.batch_size is not None:
            at_least(f"{section}.batch_size", s.batch_size, 1)
    one_of("head.cache_features", c.head.cache_features, ("auto", "on", "off"))
    for name in c.data.augment:
        one_of("data.augment", name, AUGMENTATIONS)
    if c.head.cache_features == "on" and c.data.augment:
        fail("head.cache_features", "on cannot be used with data.augment: augmented images change every epoch")
    at_least("head.feature_cache_mb", c.head.feature_cache_mb, 0)
    _check_search(c.head.search, c.caches_features, fail)
    one_of("scaling.mixed_precision", c.scaling.mixed_precision, ("auto", "float16", "bfloat16", "off"))
    unfreeze = c.finetune.unfreeze
    if isinstance(unfreeze, int) and unfreeze < 1:
        fail("finetune.unfreeze", f"must be a layer count >= 1, a layer name, or all; got {unfreeze}")
    if not c.scaling.world_sizes:
        fail("scaling.num_workers", f"[min, max] needs min <= max, got {list(c.scaling.num_workers)}")
    at_least("scaling.num_workers", c.scaling.world_sizes[0], 1)
    at_least("scaling.cpus_per_worker", c.scaling.cpus_per_worker, 1)
    at_least("scaling.max_failures", c.scaling.max_failures, 0)
    at_least("scaling.collective_timeout_s", c.scaling.collective_timeout_s, 1)
    if c.scaling.jit_compile and not c.scaling.use_gpu and max(c.scaling.world_sizes) > 1:
        fail(
            "scaling.jit_compile",
            "XLA has no collectives on CPU, and the gradients' all-reduce is inside the compiled step: "
            "use it with use_gpu: true or num_workers: 1",
        )
