"""Frozen run configuration: one object flows from the CLI (or a study trial) to the run.

Every user-settable field has a type, a default and a one-line docstring (the ``#:`` comment).
Fields left ``None`` are filled by a preset (SCConv preset, training preset); ``resolved()``
returns the filled copy, and that copy is what gets recorded.

A flat namespace addresses every field: ``scconv.<field>`` for the SCConv fields and the bare
field name for everything else (``backbone``, ``dataset``, ``lr``, ``seed``...). Study spaces,
``--set key=value`` and ``to_params()`` all use it.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

from ablate.errors import ConfigError, check, check_choice, did_you_mean, is_int, is_number

ORDERS = ("none", "sru", "cru", "sru_cru", "cru_sru", "parallel")
GATE_MODES = ("binary", "reference", "soft", "ste")
GAMMA_NORMS = ("sum", "abs")
ATTENTIONS = ("pairwise", "global")
IMPLS = ("reference", "efficient")
#: When the efficient SCConv recomputes its body (or, ``sru``, the SRU and the CRU's squeezes) in backward instead
#: of keeping its activations (docs/scconv.md).
RECOMPUTE_POLICIES = ("auto", "size", "always", "never", "sru")
PLACEMENTS = ("replace", "insert")

#: SCConv presets; a preset fills only the fields the user left unset (None).
SCCONV_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"gate_mode": "binary", "gamma_norm": "sum", "attention": "pairwise", "gn_groups": 4},
    "reference": {"gate_mode": "reference", "gamma_norm": "sum", "attention": "global", "gn_groups": 4},
}

DATASETS = ("digits", "cifar100", "food101", "imagefolder")
DEVICES = ("auto", "cpu", "cuda")
DECODES = ("cpu", "gpu")
#: Datasets stored as JPEG files, which ``decode = "gpu"`` can decode on the device.
JPEG_DATASETS = ("food101", "imagefolder")
DATASET_CLASSES = {"digits": 10, "cifar100": 100, "food101": 101}
MAX_IMAGE_SIZE = 4096  #: the largest input side accepted, in pixels
#: The embedded digits at their native 8x8, made hard enough that validation loss stays well above 0
#: (docs/scconv.md, "The embedded digits"); image_size=32, label_noise=0, train_size=1437 is the old easy task.
DIGITS_DEFAULTS: dict[str, Any] = {"image_size": 8, "label_noise": 0.2, "train_size": 500}


@dataclass(frozen=True)
class SCConvConfig:
    """How every selected 3x3 conv is replaced (see docs/scconv.md)."""

    order: str = "sru_cru"  #: composition: none, sru, cru, sru_cru, cru_sru, parallel
    preset: str = "paper"  #: fills unset fields: paper (binary gate, pairwise) or reference (public code)
    gate_mode: str | None = None  #: SRU gate: binary, reference, soft, ste (None: from preset)
    gate_threshold: float = 0.5  #: SRU gate threshold t on R, in (0, 1)
    gamma_norm: str | None = None  #: SRU channel weights from GroupNorm gamma: sum or abs (None: from preset)
    gn_groups: int | None = None  #: GroupNorm groups G of the SRU (None: from preset)
    alpha: float = 0.5  #: CRU split ratio: share of input channels on the upper path, in (0, 1)
    squeeze_ratio: int = 2  #: CRU squeeze ratio r of the 1x1 squeeze convs
    group_size: int = 2  #: CRU groups g of the group-wise conv (GWC)
    group_kernel: int = 3  #: CRU kernel size k of the GWC (odd)
    attention: str | None = None  #: CRU fuse: pairwise (paper Eq. 3) or global (public code) (None: from preset)
    impl: str = "efficient"  #: implementation: efficient (default; same function, less memory) or reference (readable definition)
    recompute: str = "auto"  #: efficient impl: which SCConvs recompute in backward: auto (planned from measured cost), size (bodies of inputs >= 1 MiB), always (bodies), never, sru (the SRU's output and the CRU's squeezes, order sru_cru); memory and time only

    def __post_init__(self) -> None:
        check_choice("scconv.order", self.order, ORDERS)
        check_choice("scconv.preset", self.preset, tuple(SCCONV_PRESETS))
        if self.gate_mode is not None:
            check_choice("scconv.gate_mode", self.gate_mode, GATE_MODES)
        if self.gamma_norm is not None:
            check_choice("scconv.gamma_norm", self.gamma_norm, GAMMA_NORMS)
        if self.attention is not None:
            check_choice("scconv.attention", self.attention, ATTENTIONS)
        check_choice("scconv.impl", self.impl, IMPLS)
        check_choice("scconv.recompute", self.recompute, RECOMPUTE_POLICIES)
        check("scconv.gate_threshold", self.gate_threshold,
              is_number(self.gate_threshold) and 0.0 < self.gate_threshold < 1.0, "a number in (0, 1)")
        check("scconv.alpha", self.alpha, is_number(self.alpha) and 0.0 < self.alpha < 1.0, "a number in (0, 1)")
        if self.gn_groups is not None:
            check("scconv.gn_groups", self.gn_groups, is_int(self.gn_groups) and self.gn_groups >= 1, "an integer >= 1")
        check("scconv.squeeze_ratio", self.squeeze_ratio, is_int(self.squeeze_ratio) and self.squeeze_ratio >= 1, "an integer >= 1")
        check("scconv.group_size", self.group_size, is_int(self.group_size) and self.group_size >= 1, "an integer >= 1")
        check(
            "scconv.group_kernel", self.group_kernel,
            is_int(self.group_kernel) and self.group_kernel >= 1 and self.group_kernel % 2 == 1, "an odd integer >= 1",
        )

    def resolved(self) -> "SCConvConfig":
        """A copy with every preset-filled field set (user-set fields win)."""
        fill = {k: v for k, v in SCCONV_PRESETS[self.preset].items() if getattr(self, k) is None}
        return replace(self, **fill) if fill else self


@dataclass(frozen=True)
class ModelConfig:
    """Which backbone, and how SCConv is placed in it."""

    backbone: str = "resnet20"  #: registered backbone: resnet20, resnet56, resnet50, densenet121
    num_classes: int | None = None  #: classifier outputs (None: from the dataset; 1000 without one)
    placement: str = "replace"  #: DenseNet only: replace the 3x3 conv, or insert SCConv(128->128) before it
    scconv: SCConvConfig = field(default_factory=SCConvConfig)  #: the SCConv variant

    def __post_init__(self) -> None:
        if self.num_classes is not None:
            check("num_classes", self.num_classes, is_int(self.num_classes) and self.num_classes >= 1, "an integer >= 1")
        check_choice("placement", self.placement, PLACEMENTS)
        # The backbone name is checked against the registry in ablate.models.build_model.

    def resolved(self, num_classes: int = 1000) -> "ModelConfig":
        """Fill the SCConv preset and, when unset, the number of classes."""
        return replace(self, scconv=self.scconv.resolved(), num_classes=self.num_classes or num_classes)


@dataclass(frozen=True)
class DataConfig:
    """Which images, where they live, and how big."""

    dataset: str = "digits"  #: digits (embedded), cifar100, food101, imagefolder
    data_root: str = "~/.cache/scconv-ablate/data"  #: folder holding the datasets (imagefolder: train/ and val/)
    image_size: int | None = None  #: input side in pixels (None: the dataset's recipe: digits 8, others 224)
    download: bool = False  #: fetch cifar100/food101 with torchvision's downloader when missing
    num_workers: int | str = "auto"  #: DataLoader worker processes: auto (the CPU cores this run may use; 0 for in-memory sets) or a count
    decode: str = "cpu"  #: where JPEGs are decoded: cpu (PIL in the loader workers) or gpu (decode_jpeg and transforms on CUDA; food101, imagefolder)
    probe_size: int = 64  #: validation images in the fixed gate-probe batch
    label_noise: float | None = None  #: digits only: share of train and val labels swapped for another class, fixed seed (None: digits 0.2, others 0)
    train_size: int | None = None  #: digits only: training images kept, stratified, fixed (None: digits 500, others all)

    def __post_init__(self) -> None:
        check_choice("dataset", self.dataset, DATASETS)
        if self.image_size is not None:
            # The bound keeps a typo (100000) a one-line error instead of a terabyte allocation.
            check("image_size", self.image_size, is_int(self.image_size) and 8 <= self.image_size <= MAX_IMAGE_SIZE,
                  f"an integer in 8..{MAX_IMAGE_SIZE}")
        check("num_workers", self.num_workers,
              self.num_workers == "auto" or (is_int(self.num_workers) and self.num_workers >= 0), "auto or an integer >= 0")
        check_choice("decode", self.decode, DECODES)
        if self.decode == "gpu":
            check("decode", self.decode, self.dataset in JPEG_DATASETS,
                  f"cpu (dataset {self.dataset!r} is not stored as JPEG files; gpu decodes {', '.join(JPEG_DATASETS)})")
        check("probe_size", self.probe_size, is_int(self.probe_size) and self.probe_size >= 1, "an integer >= 1")
        digits = self.dataset == "digits"
        if self.label_noise is not None:
            check("label_noise", self.label_noise,
                  is_number(self.label_noise) and (0 <= self.label_noise < 1 if digits else self.label_noise == 0),
                  "a number in [0, 1)" if digits else "0 (label noise applies to the digits dataset only)")
        if self.train_size is not None:
            check("train_size", self.train_size, digits and is_int(self.train_size) and self.train_size >= 10,
                  "an integer >= 10" if digits else "none (train_size applies to the digits dataset only)")

    def resolved(self) -> "DataConfig":
        """Fill image_size, label_noise and train_size from the dataset's defaults where unset."""
        defaults = DIGITS_DEFAULTS if self.dataset == "digits" else {"image_size": 224, "label_noise": 0.0}
        fill = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        return replace(self, **fill) if fill else self


#: Training presets of the study we follow (batch size by backbone family: see resolved()).
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "cifar100": {"epochs": 200, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "milestones": (100, 150)},
    "food101": {"epochs": 100, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "milestones": (30, 60, 90)},
    "digits": {"epochs": 15, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "milestones": (10,), "batch_size": 64},
}


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation recipe; unset fields come from the training preset."""

    preset: str = "auto"  #: training preset: auto (by dataset; imagefolder uses food101), cifar100, food101, digits
    epochs: int | None = None  #: number of epochs
    batch_size: int | None = None  #: images per step (None: preset; 64 for DenseNets, 128 for ResNets)
    lr: float | None = None  #: initial SGD learning rate
    momentum: float | None = None  #: SGD momentum
    weight_decay: float | None = None  #: SGD weight decay
    milestones: tuple[int, ...] | None = None  #: epochs at which the lr is multiplied by lr_decay
    lr_decay: float = 0.1  #: factor applied at each milestone
    seed: int = 0  #: seed of python, numpy, torch and the data order
    device: str = "auto"  #: auto (CUDA when available), cpu or cuda
    amp: bool = True  #: bf16 autocast on CUDA (ignored on CPU)
    channels_last: bool = True  #: channels_last memory format on CUDA (ignored on CPU)
    compile: bool = False  #: torch.compile the model for training steps (inductor, CPU or CUDA; the first step compiles, minutes on a CPU)
    max_steps_per_epoch: int | None = None  #: cap on training steps per epoch (smoke runs); None: full epoch
    num_threads: int | None = None  #: CPU intra-op threads (None: torch's default; 1 is faster on a busy machine)

    def __post_init__(self) -> None:
        check_choice("preset", self.preset, ("auto", *TRAIN_PRESETS))
        check_choice("device", self.device, DEVICES)
        for name in ("epochs", "batch_size", "max_steps_per_epoch", "num_threads"):
            v = getattr(self, name)
            if v is not None:
                check(name, v, is_int(v) and v >= 1, "an integer >= 1")
        for name in ("lr", "momentum", "weight_decay"):
            v = getattr(self, name)
            if v is not None:
                check(name, v, is_number(v) and v >= 0, "a finite number >= 0")
        if self.lr is not None:
            check("lr", self.lr, self.lr > 0, "a number > 0")
        check("lr_decay", self.lr_decay, is_number(self.lr_decay) and 0 < self.lr_decay <= 1, "a number in (0, 1]")
        check("seed", self.seed, is_int(self.seed) and self.seed >= 0, "an integer >= 0")
        if self.milestones is not None:
            check(
                "milestones", self.milestones,
                all(is_int(m) and m >= 1 for m in self.milestones) and list(self.milestones) == sorted(self.milestones),
                "increasing integers >= 1, e.g. 30,60,90",
            )

    def resolved(self, dataset: str, backbone: str) -> "TrainConfig":
        """Fill unset fields from the preset (auto: the dataset's own)."""
        name = self.preset
        if name == "auto":
            name = {"imagefolder": "food101"}.get(dataset, dataset)
        preset = dict(TRAIN_PRESETS[name])
        preset.setdefault("batch_size", 64 if backbone.startswith("densenet") else 128)
        fill = {k: v for k, v in preset.items() if getattr(self, k) is None}
        return replace(self, preset=name, **fill)


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)  #: backbone and SCConv variant
    data: DataConfig = field(default_factory=DataConfig)  #: dataset and input size
    train: TrainConfig = field(default_factory=TrainConfig)  #: optimisation recipe
    experiment: str = "scconv-ablate"  #: MLflow experiment name
    run_name: str | None = None  #: MLflow run name (None: the variant label)
    log_checkpoint: bool = True  #: log the final checkpoint as an MLflow artifact
    checkpoint_every_minutes: float = 10.0  #: inside a long epoch, checkpoint (and upload) at least this often
    system_metrics: bool = True  #: sample CPU, memory (and the run's GPU) into the run as MLflow system metrics
    gate_metrics_per_layer: bool = False  #: also log every layer's gate statistics as metrics (they are always in gate_stats.csv)

    def __post_init__(self) -> None:
        check("experiment", self.experiment, isinstance(self.experiment, str) and self.experiment.strip() != "", "a non-empty name")
        check("checkpoint_every_minutes", self.checkpoint_every_minutes,
              is_number(self.checkpoint_every_minutes) and self.checkpoint_every_minutes > 0, "a number of minutes > 0")

    def resolved(self) -> "RunConfig":
        """Fill every preset-dependent field; the number of classes follows the dataset when known."""
        data = self.data.resolved()
        model = self.model
        if model.num_classes is None and data.dataset in DATASET_CLASSES:
            model = replace(model, num_classes=DATASET_CLASSES[data.dataset])
        model = replace(model, scconv=model.scconv.resolved())  # imagefolder: classes set once the data is read
        return replace(self, model=model, data=data, train=self.train.resolved(data.dataset, model.backbone))

    # -- flat namespace ---------------------------------------------------------------------

    def to_params(self) -> dict[str, Any]:
        """Flatten to MLflow params: ``scconv.<field>`` and bare names for the rest."""
        out: dict[str, Any] = {}
        for key, (section, name) in _flat_index().items():
            value = getattr(_section(self, section), name)
            out[key] = ",".join(map(str, value)) if isinstance(value, tuple) else value
        return out

    def label(self) -> str:
        """Short variant label, e.g. ``resnet20/sru_cru``."""
        return f"{self.model.backbone}/{self.model.scconv.order}"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], base: "RunConfig | None" = None) -> "RunConfig":
        """Build from flat keys (``scconv.alpha``, ``lr``) or nested sections; unknown keys are errors."""
        flat = _flatten_input(values)
        index = _flat_index()
        sections: dict[str, dict[str, Any]] = {"model": {}, "scconv": {}, "data": {}, "train": {}, "run": {}}
        for key, value in flat.items():
            if key not in index:
                raise ConfigError(f"unknown config key {key!r}{did_you_mean(key, index)}; see `ablate train --help`")
            section, name = index[key]
            sections[section][name] = _coerce(section, name, value)
        base = base or cls()
        scconv = replace(base.model.scconv, **sections["scconv"])
        model = replace(base.model, scconv=scconv, **sections["model"])
        return replace(
            base, model=model, data=replace(base.data, **sections["data"]),
            train=replace(base.train, **sections["train"]), **sections["run"],
        )

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (config.json)."""
        return dataclasses.asdict(self)


_SECTION_TYPES = {"model": ModelConfig, "scconv": SCConvConfig, "data": DataConfig, "train": TrainConfig, "run": RunConfig}
_NESTED = {"model", "data", "train", "scconv"}


def _section(cfg: RunConfig, section: str):
    return {"model": cfg.model, "scconv": cfg.model.scconv, "data": cfg.data, "train": cfg.train, "run": cfg}[section]


def _flat_index() -> dict[str, tuple[str, str]]:
    """Flat key -> (section, field name)."""
    index: dict[str, tuple[str, str]] = {}
    for section, typ in _SECTION_TYPES.items():
        for f in fields(typ):
            if f.name in _NESTED:
                continue
            key = f"scconv.{f.name}" if section == "scconv" else f.name
            if section == "train" and f.name == "preset":
                key = "train_preset"
            index[key] = (section, f.name)
    return index


def field_docs() -> dict[str, str]:
    """Flat key -> 'type, default: docstring' (for --help and error hints)."""
    import inspect
    import re

    out = {}
    for key, (section, name) in _flat_index().items():
        src = inspect.getsource(_SECTION_TYPES[section])
        m = re.search(rf"^\s+{name}: .*?#: (.*)$", src, re.M)
        out[key] = m.group(1) if m else ""
    return out


def _flatten_input(values: Mapping[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and key == "train":
            flat.update({("train_preset" if k == "preset" else k): v for k, v in value.items()})
        elif isinstance(value, Mapping) and key in ("model", "data", "run"):
            flat.update(_flatten_input(value))
        elif isinstance(value, Mapping) and key == "scconv":
            flat.update({f"scconv.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def _coerce(section: str, name: str, value: Any) -> Any:
    """Turn a string (from --set or a form) into the field's type; other values pass through."""
    hints = typing.get_type_hints(_SECTION_TYPES[section])
    typ = hints[name]
    args = [a for a in typing.get_args(typ) if a is not type(None)] or [typ]
    base = args[0]
    key = f"scconv.{name}" if section == "scconv" else name
    if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in typing.get_args(typ):
        return None
    try:
        if base is bool:
            if isinstance(value, str):
                low = value.lower()
                if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError
                return low in ("1", "true", "yes", "on")
            return bool(value)
        if base is int:
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str) and str in args and not value.strip().lstrip("+-").isdigit():
                return value  # a keyword such as "auto": the section's own check names what is accepted
            return int(value) if isinstance(value, str) else value
        if base is float:
            if isinstance(value, str) and "/" in value:  # allow fractions such as 3/8
                num, den = value.split("/", 1)
                return float(num) / float(den)
            return float(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else value
        if typing.get_origin(base) is tuple:
            if isinstance(value, str):
                return tuple(int(v) for v in value.replace(" ", "").split(",") if v)
            if isinstance(value, (list, tuple)):
                return tuple(int(v) for v in value)
            return (int(value),)
    except (TypeError, ValueError, ZeroDivisionError):
        raise ConfigError(f"{key}={value!r} is not valid; accepted: {_type_name(base)}") from None
    return value


def _type_name(t) -> str:
    if typing.get_origin(t) is tuple:
        return "comma-separated integers"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(t, str(t))


def parse_assignments(items: list[str] | None) -> dict[str, str]:
    """Parse ``--set key=value`` items."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is not valid; accepted: key=value, e.g. scconv.alpha=0.25")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


#: Keys whose values combine in the layer rules of docs/scconv.md (a rule names one key, another may cause it).
LAYER_RULE_KEYS = ("backbone", "placement", "scconv.preset", "scconv.gn_groups", "scconv.alpha",
                   "scconv.squeeze_ratio", "scconv.group_size")
_LAYER_ERROR = re.compile(r"^(?P<where>[\w.]+): (?P<key>[\w.]+)=(?P<value>\S+) is not valid: (?P<rule>.*)$")


def blame_user_keys(error: ConfigError, user_set: Mapping[str, Any]) -> ConfigError:
    """Reword a layer rule that names a key the user left at its default while a key the user set broke it.

    ``user_set`` holds the flat keys the user gave. The result names the user's keys, the default that conflicts,
    and the fix; any other error comes back unchanged.
    """
    m = _LAYER_ERROR.match(str(error))
    if m is None or m["key"] not in LAYER_RULE_KEYS or m["key"] in user_set:
        return error
    mine = [k for k in LAYER_RULE_KEYS if k in user_set]
    if not mine:
        return error
    rule, _, accepted = m["rule"].partition("; accepted: ")
    yours = ", ".join(f"{k}={user_set[k]}" for k in mine)
    fix = f"set {m['key']} too ({accepted})" if accepted else f"set {m['key']} too"
    return ConfigError(f"{m['where']}: {yours} (set by you) conflicts with the default {m['key']}={m['value']}: "
                       f"{rule}; fix: {fix}, or change {' or '.join(mine)}")
