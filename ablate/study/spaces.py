"""Search spaces: ``studies/NAME.toml`` read and validated into a :class:`Space`.

A space file has up to four tables::

    [study]    name, description, direction | directions, objective | objectives, sampler, pruner,
               n_trials, seeds
    [base]     fixed run settings by config key (dataset, backbone, epochs, ...)
    [params]   swept config keys: a list of values (grid or categorical) or {low, high, step | log}
    [variants] optional named bundles of config keys, swept as one categorical ``variant`` (so a baseline that
               ignores a field, e.g. order none and the gate mode, is not repeated for each of its values)

``seeds = [0, 1, 2]`` repeats every cell with each seed (a grid dimension named ``seed``). Every error is one
line naming the file (and the line where it is known), the key and what is accepted; nothing is created
before a space validates.
"""

from __future__ import annotations

import itertools
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ablate.config import RunConfig
from ablate.errors import ConfigError, check_choice, did_you_mean, is_int, is_number


def _spaces_dir() -> Path:
    """The shipped spaces: the wheel's copy inside this package, else the checkout's ``studies/`` (editable)."""
    here = Path(__file__).resolve().parent
    packaged = here / "studies"
    return packaged if packaged.is_dir() else here.parent.parent / "studies"


SPACES_DIR = _spaces_dir()
TABLES = ("study", "base", "params", "variants")
SAMPLERS = ("grid", "tpe", "random", "nsga2")
PRUNERS = ("median", "hyperband", "none")
DIRECTIONS = ("maximize", "minimize")
#: Objectives other than logged metrics: computed from the model.
STATIC_OBJECTIVES = ("macs", "params")
EPOCH_OBJECTIVES = ("val_acc", "val_loss", "train_loss", "train_acc")
STUDY_KEYS = ("name", "description", "direction", "directions", "objective", "objectives", "sampler", "pruner",
              "n_trials", "seeds")
#: Config keys the study itself sets (the experiment is the study's, run names are per trial).
RESERVED_KEYS = ("experiment", "run_name")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def check_study_name(name: Any, field_name: str = "study.name") -> str:
    """A study name usable as an MLflow experiment and in filter strings (letters, digits, ``_ . -``)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"{field_name}={name!r} is not valid; accepted: letters, digits, _ . -")
    return name


@dataclass(frozen=True)
class Range:
    """A numeric range ``{low, high, step | log}``."""

    low: float
    high: float
    step: float | None = None
    log: bool = False
    integer: bool = False

    def grid(self) -> list[float] | None:
        """The values of a stepped range, else None (continuous ranges have no grid)."""
        if self.step is None:
            return None
        n = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        values = [self.low + i * self.step for i in range(n)]
        return [int(round(v)) for v in values] if self.integer else [round(v, 12) for v in values]


@dataclass(frozen=True)
class Space:
    """A validated search space."""

    name: str
    path: Path
    description: str
    directions: tuple[str, ...]
    objectives: tuple[str, ...]
    sampler: str
    pruner: str
    n_trials: int | None
    seeds: tuple[int, ...] | None
    base: dict[str, Any] = field(default_factory=dict)
    params: dict[str, list | Range] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def is_grid(self) -> bool:
        return self.sampler == "grid"

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def swept_keys(self) -> list[str]:
        """The params that vary, in file order (``variant`` first, ``seed`` last)."""
        return (["variant"] if self.variants else []) + list(self.params) + (["seed"] if self.seeds else [])

    def axes(self) -> dict[str, list]:
        """The values of every swept key (stepped ranges expanded; continuous ranges have none)."""
        axes: dict[str, list] = {"variant": list(self.variants)} if self.variants else {}
        axes.update({k: (v if isinstance(v, list) else v.grid()) for k, v in self.params.items()})
        if self.seeds:
            axes["seed"] = list(self.seeds)
        return axes

    def cells(self) -> list[dict[str, Any]]:
        """Every grid cell (params only; ``seed`` included when seeds are set)."""
        axes = self.axes()
        keys = list(axes)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]

    def size(self) -> int | None:
        """Number of trials: the grid's cell count, else ``n_trials``."""
        return len(self.cells()) if self.is_grid else self.n_trials

    def fixed_settings(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """The settings every trial shares: [base], then the ``--set`` overrides."""
        return {**self.base, **(overrides or {})}

    def run_config(self, cell: dict[str, Any], overrides: dict[str, Any] | None = None,
                   experiment: str | None = None) -> RunConfig:
        """The RunConfig of one trial: base, then the CLI overrides, then the cell (experiment = the study's)."""
        cell = dict(cell)
        bundle = self.variants[cell.pop("variant")] if "variant" in cell else {}
        values = {**self.fixed_settings(overrides), **bundle, **cell, "experiment": experiment or self.name}
        return RunConfig.from_dict(values)


def available() -> list[str]:
    """The names of the shipped spaces."""
    return sorted(p.stem for p in SPACES_DIR.glob("*.toml"))


def space_path(name: str) -> Path:
    """The file of space ``name`` (or a path to a .toml file); unknown names list the available ones."""
    if name.endswith(".toml"):
        candidate = Path(name)
        if not candidate.is_file():
            raise ConfigError(f"space={name!r} is not valid: no such file; accepted: a space name "
                              f"({', '.join(available())}) or a path to a .toml file")
        return candidate
    path = SPACES_DIR / f"{name}.toml"
    if not _NAME.fullmatch(name) or not path.is_file():
        names = available()
        raise ConfigError(f"space={name!r} is not valid{did_you_mean(name, names)}; accepted: {', '.join(names)}")
    return path


def load_space(name: str, overrides: dict[str, Any] | None = None) -> Space:
    """Read and validate a space; ``overrides`` (``--set``) are checked against every cell."""
    path = space_path(name)
    try:
        text = path.read_text()
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{_display(path)}:{_toml_message(e)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{_display(path)}: not readable ({e}); accepted: a UTF-8 TOML file") from None
    return parse_space(raw, path, overrides, text)


class _Failer:
    """Builds one-line errors ``file:line: message`` (the line of ``key`` in ``table`` when found)."""

    def __init__(self, path: Path, text: str):
        self.where = _display(path)
        self.text = text

    def __call__(self, key: str, message: str, table: str | None = None) -> ConfigError:
        line = _line_of(self.text, key, table)
        return ConfigError(f"{self.where}{f':{line}' if line else ''}: {message}")


def parse_space(raw: dict[str, Any], path: Path, overrides: dict[str, Any] | None = None,
                text: str | None = None) -> Space:
    """Validate the parsed TOML of a space file (``text``, the file's source, locates errors by line)."""
    if text is None:
        text = path.read_text() if path.is_file() else ""
    fail = _Failer(path, text)
    for key in raw:
        if key not in TABLES:
            raise fail(key, f"unknown table [{key}]{did_you_mean(key, TABLES)}; accepted: "
                            + ", ".join(f"[{t}]" for t in TABLES))
        if not isinstance(raw[key], dict):
            raise fail(key, f"{key} is not a table; accepted: [{key}] with key = value lines")
    study = _parse_study(raw.get("study", {}), path, fail)
    base = dict(raw.get("base", {}))
    params = {key: _parse_param(key, value, study["sampler"], fail) for key, value in raw.get("params", {}).items()}
    variants = dict(raw.get("variants", {}))
    for vname, bundle in variants.items():
        if not isinstance(bundle, dict) or not bundle:
            raise fail(vname, f"variants.{vname}={bundle!r} is not valid; accepted: a table of config keys, e.g. "
                              '{"scconv.order" = "none"}', "variants")
    if "variant" in params:
        raise fail("variant", "params.variant is reserved; accepted: a [variants] table", "params")
    if not params and not study["seeds"] and not variants:
        raise fail("params", "[params] is empty; accepted: at least one swept key (or [variants], or study.seeds)")
    for key in params:
        if key in base:
            raise fail(key, f"{key} is both in [base] and in [params]; accepted: one of them", "params")
    if study["seeds"] and ("seed" in params or "seed" in base):
        raise fail("seeds", "study.seeds and a seed in [base]/[params] are both set; accepted: one of them", "study")
    for table, keys in (("base", base), ("params", params), *(("variants", b) for b in variants.values())):
        for key in keys:
            if key in RESERVED_KEYS:
                raise fail(key, f"{table}: {key} is set by the study; accepted: any other config key", table)

    space = Space(path=path, base=base, params=params, variants=variants, **study)
    _validate_overrides(space, overrides or {})
    _validate_configs(space, overrides or {}, fail)
    return space


def _parse_study(study: dict[str, Any], path: Path, fail) -> dict[str, Any]:
    """The [study] table as Space fields."""
    for key in study:
        if key not in STUDY_KEYS:
            raise fail(key, f"unknown key study.{key}{did_you_mean(key, STUDY_KEYS)}; "
                            f"accepted: {', '.join(STUDY_KEYS)}", "study")
    name = study.get("name", path.stem)
    try:
        check_study_name(name)
    except ConfigError as e:
        raise fail("name", str(e), "study") from None
    description = study.get("description", "")
    if not isinstance(description, str):
        raise fail("description", f"study.description={description!r} is not valid; accepted: a string", "study")
    directions = _one_or_many(study, "direction", "directions", "maximize", DIRECTIONS, fail)
    objectives = _one_or_many(study, "objective", "objectives", "val_acc", EPOCH_OBJECTIVES + STATIC_OBJECTIVES, fail)
    if len(directions) != len(objectives):
        raise fail("directions", f"study has {len(objectives)} objectives but {len(directions)} directions; "
                                 "accepted: one direction per objective", "study")
    if objectives[0] in STATIC_OBJECTIVES:
        raise fail("objective", f"study.objective={objectives[0]!r} is not valid as the first objective; "
                                f"accepted: a trained metric first ({', '.join(EPOCH_OBJECTIVES)})", "study")
    sampler = study.get("sampler", "grid")
    if sampler not in SAMPLERS:
        raise fail("sampler", f"study.sampler={sampler!r} is not valid{did_you_mean(str(sampler), SAMPLERS)}; "
                              f"accepted: {', '.join(SAMPLERS)}", "study")
    pruner = study.get("pruner", "median")
    if pruner not in PRUNERS:
        raise fail("pruner", f"study.pruner={pruner!r} is not valid{did_you_mean(str(pruner), PRUNERS)}; "
                             f"accepted: {', '.join(PRUNERS)}", "study")
    if len(objectives) > 1 and pruner != "none":
        raise fail("pruner", f"study.pruner={pruner!r} is not valid with several objectives (Optuna cannot prune "
                             "them); accepted: none", "study")
    n_trials = study.get("n_trials")
    if n_trials is not None and (not is_int(n_trials) or n_trials < 1):
        raise fail("n_trials", f"study.n_trials={n_trials!r} is not valid; accepted: an integer >= 1", "study")
    if sampler != "grid" and n_trials is None:
        raise fail("sampler", f"study.n_trials is missing; accepted: an integer >= 1 (needed by sampler {sampler!r})",
                   "study")
    seeds = study.get("seeds")
    if seeds is not None:
        if (not isinstance(seeds, list) or not seeds or not all(is_int(s) and s >= 0 for s in seeds)
                or len(set(seeds)) != len(seeds)):
            raise fail("seeds", f"study.seeds={seeds!r} is not valid; accepted: a list of distinct integers >= 0",
                       "study")
        seeds = tuple(seeds)
    return dict(name=name, description=description, directions=directions, objectives=objectives,
                sampler=sampler, pruner=pruner, n_trials=n_trials, seeds=seeds)


def _one_or_many(study: dict[str, Any], one: str, many: str, default: str, accepted: tuple, fail) -> tuple[str, ...]:
    """``direction = "x"`` or ``directions = ["x", "y"]`` (not both), each value checked."""
    if one in study and many in study:
        raise fail(many, f"study.{one} and study.{many} are both set; accepted: one of them", "study")
    if many in study:
        values = study[many]
        if not isinstance(values, list) or not values:
            raise fail(many, f"study.{many}={values!r} is not valid; accepted: a list of {', '.join(accepted)}",
                       "study")
        key = many
    else:
        values, key = [study.get(one, default)], one
    for v in values:
        if not isinstance(v, str) or v not in accepted:
            raise fail(key, f"study.{one}={v!r} is not valid{did_you_mean(str(v), accepted)}; "
                            f"accepted: {', '.join(accepted)}", "study")
    return tuple(values)


def _parse_param(key: str, value: Any, sampler: str, fail) -> list | Range:
    if isinstance(value, list):
        if not value:
            raise fail(key, f"params.{key} is an empty list; accepted: one or more values", "params")
        if not all(isinstance(v, (str, int, float, bool)) for v in value):
            raise fail(key, f"params.{key}={value!r} is not valid; accepted: a list of strings, numbers or booleans "
                            '(write tuples as strings, e.g. "30,60")', "params")
        if len(set(value)) != len(value):
            raise fail(key, f"params.{key}={value!r} repeats a value; accepted: distinct values", "params")
        return value
    if isinstance(value, dict):
        extra = set(value) - {"low", "high", "step", "log"}
        if extra or "low" not in value or "high" not in value:
            raise fail(key, f"params.{key}={value!r} is not valid; accepted: {{low, high, step}} or "
                            "{low, high, log = true}", "params")
        low, high = value["low"], value["high"]
        if not (is_number(low) and is_number(high)) or low >= high:
            raise fail(key, f"params.{key}: low={low!r}, high={high!r} is not valid; accepted: numbers with low < high",
                       "params")
        step, log = value.get("step"), value.get("log", False)
        if not isinstance(log, bool):
            raise fail(key, f"params.{key}: log={log!r} is not valid; accepted: true or false", "params")
        if step is not None and (not is_number(step) or step <= 0 or log):
            raise fail(key, f"params.{key}: step={step!r} is not valid; accepted: a number > 0 (and no log)", "params")
        if log and low <= 0:
            raise fail(key, f"params.{key}: low={low!r} is not valid with log; accepted: low > 0", "params")
        integer = all(is_int(v) for v in (low, high, step if step is not None else 1))
        rng = Range(float(low), float(high), float(step) if step is not None else None, log, integer)
        if sampler == "grid" and rng.grid() is None:
            raise fail(key, f"params.{key} has no step; accepted: a list or {{low, high, step}} with the grid sampler",
                       "params")
        return rng
    raise fail(key, f"params.{key}={value!r} is not valid; accepted: a list of values or {{low, high, step | log}}",
               "params")


def _validate_overrides(space: Space, overrides: dict[str, Any]) -> None:
    """``--set`` keys must be config keys that the space does not sweep."""
    try:
        _check_config(overrides)
    except ConfigError as e:
        raise ConfigError(f"--set {e}") from None
    swept = set(space.params) | {k for bundle in space.variants.values() for k in bundle}
    if space.seeds:
        swept.add("seed")
    for key in overrides:
        if key in RESERVED_KEYS:
            raise ConfigError(f"--set {key}={overrides[key]!r} is not valid: the study sets {key}; "
                              "accepted: any other config key (use --study-name to name the study)")
        if key in swept:
            raise ConfigError(f"--set {key}={overrides[key]!r} is not valid: space {space.name!r} sweeps {key}; "
                              "accepted: a key that is not in [params], [variants] or study.seeds")


def _validate_configs(space: Space, overrides: dict[str, Any], fail) -> None:
    """Every value must make a valid RunConfig on its own (cells that break a layer rule are skipped later)."""
    try:
        _check_config(space.base)
    except ConfigError as e:
        raise fail(_key_in(str(e)), f"[base] {e}", "base") from None
    try:
        _check_config(space.fixed_settings(overrides))
    except ConfigError as e:
        raise ConfigError(f"--set {e}") from None
    for vname, bundle in space.variants.items():
        try:
            _check_config({**space.fixed_settings(overrides), **bundle})
        except ConfigError as e:
            raise fail(vname, f"[variants] {vname}: {e}", "variants") from None
    for key, values in space.params.items():
        probe = values if isinstance(values, list) else (values.grid() or [values.low, values.high])
        for value in probe:
            try:
                _check_config({**space.fixed_settings(overrides), key: value})
            except ConfigError as e:
                raise fail(key, f"[params] {e}", "params") from None


def _check_config(values: dict[str, Any]) -> RunConfig:
    """RunConfig.from_dict plus the backbone name (checked against the model registry)."""
    cfg = RunConfig.from_dict(values)
    if "backbone" in values:
        from ablate.models import list_models

        check_choice("backbone", cfg.model.backbone, tuple(list_models()))
    return cfg


def _key_in(message: str) -> str:
    """The config key an error message starts with (``alpha=...`` or ``unknown config key 'x'``)."""
    m = re.match(r"(?:unknown config key ')?([\w.]+)", message)
    return m.group(1) if m else ""


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _line_of(text: str, key: str, table: str | None = None) -> int | None:
    """1-based line where ``key`` is defined (quoted or bare), inside ``[table]`` when given."""
    if not key:
        return None
    lines = text.splitlines()
    start, stop = 0, len(lines)
    if table is not None:
        header = re.compile(rf"^\s*\[\s*{re.escape(table)}\s*\]")
        starts = [i for i, line in enumerate(lines) if header.match(line)]
        if starts:
            start = starts[0] + 1
            stop = next((i for i in range(start, len(lines)) if re.match(r"^\s*\[", lines[i])), len(lines))
    pattern = re.compile(rf'^\s*(\[\s*{re.escape(key)}\s*\]|["\']?{re.escape(key)}["\']?\s*=)')
    for i in range(start, stop):
        if pattern.match(lines[i]):
            return i + 1
    return None


def _toml_message(e: "tomllib.TOMLDecodeError") -> str:
    # tomllib says "... (at line 3, column 7)"; put the line first like every other error here.
    msg = str(e)
    m = re.search(r"\(at line (\d+), column (\d+)\)", msg)
    if m:
        return f"{m.group(1)}: {msg[:m.start()].strip()} (column {m.group(2)}); accepted: valid TOML"
    return f" {msg}; accepted: valid TOML"
