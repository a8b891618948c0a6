"""Loading, checking and writing training configurations (STYLE.md §4).

Merge order: dataclass defaults ← YAML file ← `key=value` dotted overrides. Every value is checked
against its field's type (ints promote to floats, lists become tuples, `None` only where the field is
optional, choices where the field is a `Literal`); unknown keys are a `ConfigError` naming the full
dotted path with close matches, in files and overrides alike. Impossible values are rejected before
anything compiles (`validate`); what depends on the device count is checked by
`validate_for_devices`. Official keys that have no effect here are accepted with a one-line warning
when they are given a non-default value.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.resources
import logging
import math
import re
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from dinov3_jax.configs.schema import (
    CONDITIONAL_NO_EFFECT_KEYS,
    FIXED_KEYS,
    LEGACY_KEYS,
    NO_EFFECT_KEYS,
    RESUME_SAFE_KEYS,
    V1_SCHEDULE_KEYS,
    Config,
    ConfigError,
    ScheduleEntry,
    global_batch_size,
    mesh_shape,
    student_backbone_config,
)

log = logging.getLogger(__name__)

DEFAULT_RECIPE = "tiny_cpu"
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


# --------------------------------------------------------------------------------------------
# Built-in recipes.
# --------------------------------------------------------------------------------------------


def _recipes_dir():
    return importlib.resources.files("dinov3_jax.configs").joinpath("recipes")


def list_recipes() -> list[str]:
    """Names of the built-in recipes (`src/dinov3_jax/configs/recipes/*.yaml`)."""
    return sorted(p.name[: -len(".yaml")] for p in _recipes_dir().iterdir() if p.name.endswith(".yaml"))


def _read_source(path_or_name: str) -> tuple[str, str]:
    """(text, label) of an existing YAML file, or of a built-in recipe given by its bare name."""
    path = Path(path_or_name).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not a text (YAML) file") from None
    stem = re.sub(r"\.ya?ml$", "", path_or_name)
    recipe = _recipes_dir().joinpath(*stem.split("/"))
    recipe = recipe.parent.joinpath(f"{recipe.name}.yaml")
    if recipe.is_file():  # a bare name, or a student's file such as students/vits16
        return recipe.read_text(), f"built-in recipe {stem}"
    if "/" in path_or_name or "\\" in path_or_name:
        raise ConfigError(f"config file {path_or_name!r} does not exist")
    names = list_recipes()
    close = difflib.get_close_matches(stem, names, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ConfigError(
        f"no config file or built-in recipe named {path_or_name!r}{hint}; built-in recipes: {', '.join(names)}"
    )


# --------------------------------------------------------------------------------------------
# Typed merge.
# --------------------------------------------------------------------------------------------


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    if _is_union(tp):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} values"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if tp is Any:
        return "any value"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _strip_optional(tp):
    """The dataclass type inside `X | None`, or None when the type is not (optionally) a dataclass."""
    if dataclasses.is_dataclass(tp):
        return tp
    if _is_union(tp):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            return inner[0]
    return None


def _freeze(value):
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return {k: _freeze(v) for k, v in value.items()}
    return value


class _Context:
    """Where values come from (for messages), legacy keys met, and the leaf keys that were set."""

    def __init__(self, source: str):
        self.source = source
        self.legacy: list[str] = []
        self.touched: list[str] = []


def _coerce(value, tp, path: str, ctx: _Context):
    """`value` converted to the field type `tp`, or a ConfigError naming `path`."""

    def fail(extra: str = ""):
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}{extra} ({ctx.source})")

    if tp is Any:
        return _freeze(value)
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            fail()
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path, ctx)
            except ConfigError:
                continue
        fail()
    if value is None:
        fail(" (this key may not be null)")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        fail(f" (did you mean {close[0]!r}?)" if close else "")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return _merge(tp(), value, path, ctx)
        fail()
    if origin is tuple:
        variadic_numbers = len(args) == 2 and args[1] is Ellipsis and args[0] in (int, float)
        if variadic_numbers and isinstance(value, int | float) and not isinstance(value, bool):
            value = [value]  # a scalar where a list of scalars is expected: a list of one (runtime.knn_k=20)
        if not isinstance(value, list | tuple):
            fail()
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}[{i}]", ctx) for i, v in enumerate(value))
        if len(value) != len(args):
            fail(f" ({len(value)} values)")
        return tuple(_coerce(v, a, f"{path}[{i}]", ctx) for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        fail()
    if tp is float:
        number = None
        if (isinstance(value, int | float) and not isinstance(value, bool)) or (
            isinstance(value, str) and _FLOAT_RE.match(value.strip())
        ):
            number = float(value)
        if number is None:
            fail()
        if not math.isfinite(number):  # .nan / .inf would pass every range check and poison the run
            fail(" (not a finite number)")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        fail()
    raise TypeError(f"{path}: unsupported field type {tp!r}")  # a bug in the schema, not in the input


def _unknown_key(cls, key: str, path: str, ctx: _Context) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    prefix = f"{path}." if path else ""
    if close:
        hint = " (did you mean " + ", ".join(f"{prefix}{c}" for c in close) + "?)"
    else:
        # Maybe the key exists in another section (e.g. optim.teacher_temp → teacher.teacher_temp).
        elsewhere = [p for p in _all_keys() if p.rsplit(".", 1)[-1] == key]
        elsewhere = elsewhere or difflib.get_close_matches(f"{prefix}{key}", _all_keys(), n=3, cutoff=0.75)
        hint = f" (did you mean {', '.join(elsewhere)}?)" if elsewhere else ""
    return ConfigError(f"unknown config key '{prefix}{key}'{hint} ({ctx.source})")


def _is_legacy(full: str) -> bool:
    if full in LEGACY_KEYS:
        return True
    parts = full.split(".")
    return any(".".join(parts[:i]) + ".*" in LEGACY_KEYS for i in range(1, len(parts) + 1))


def _merge(current, raw, path: str, ctx: _Context):
    """A copy of the dataclass instance `current` with the (nested) values of the mapping `raw`."""
    cls = type(current)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {raw!r} ({ctx.source})")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    changes = {}
    for key, value in raw.items():
        key = str(key)
        full = f"{path}.{key}" if path else key
        if key not in names:
            if _is_legacy(full):
                ctx.legacy.append(full)
                continue
            raise _unknown_key(cls, key, path, ctx)
        tp = hints[key]
        sub = _strip_optional(tp)
        if sub is not None and isinstance(value, dict):
            base = getattr(current, key)
            changes[key] = _merge(base if base is not None else sub(), value, full, ctx)
        else:
            changes[key] = _coerce(value, tp, full, ctx)
            ctx.touched.append(full)
    return dataclasses.replace(current, **changes)


def _parse_override(item: str, ctx: _Context) -> dict:
    """`a.b.c=value` → {"a": {"b": {"c": value}}}, the value parsed as a YAML scalar or flow list."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=0.0005)")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {text!r} of override {item!r}: {e}") from None
    nested: Any = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested


# --------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps
    the last silently, so a recipe could say two things and mean one)."""

    def construct_mapping(self, node, deep=False):
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in lines:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (lines {lines[key]} and {line})", key_node.start_mark
                )
            lines[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_mapping(path_or_name: str) -> tuple[dict, str]:
    """(the mapping of config sections, label) of a YAML file or built-in recipe."""
    text, label = _read_source(path_or_name)
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse {label}: {e}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{label} holds a YAML {type(raw).__name__}, not a mapping of config sections")
    return raw or {}, label


def load_config(path_or_name: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults ← YAML (a file path, or a built-in recipe name; None = `tiny_cpu`) ← overrides."""
    raw, label = _read_mapping(DEFAULT_RECIPE if path_or_name is None else str(path_or_name))
    return config_from_dict(raw, overrides, source=label)


def config_from_dict(data: dict, overrides: Sequence[str] = (), *, source: str = "dict") -> Config:
    """Defaults ← the nested mapping `data` (the content of a YAML file) ← overrides."""
    ctx = _Context(source)
    cfg = _merge(Config(), data, "", ctx)
    return _overrides_and_finish(cfg, overrides, ctx)


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """`cfg` with `key=value` dotted overrides applied, then checked."""
    return _overrides_and_finish(cfg, overrides, _Context("override"))


def _overrides_and_finish(cfg: Config, overrides: Iterable[str], ctx: _Context) -> Config:
    if isinstance(overrides, str):
        raise TypeError("overrides must be a list of 'key=value' strings, not a single string")
    for item in overrides:
        ctx.source = f"override {item!r}"
        cfg = _merge(cfg, _parse_override(item, ctx), "", ctx)
    validate(cfg)
    _warn_no_effect(cfg, ctx)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """The nested plain-Python mapping of the config (tuples as lists), as written to YAML."""

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(cfg))


def config_to_yaml(cfg: Config) -> str:
    """The full resolved config as YAML; `load_config` of this text gives `cfg` back."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False, width=120)


def get_key(cfg: Any, dotted: str) -> Any:
    """The value at a dotted key, e.g. get_key(cfg, "optim.lr")."""
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _under_any(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(f"{p}.") for p in prefixes)


def resume_differences(stored: dict, current: dict, allow: Sequence[str] = ()) -> list[str]:
    """`key: stored → current` for every dotted key whose value differs between two nested
    mappings (a run's config as `config_to_dict` gives it, plus `run.*` facts such as the global
    batch), except `RESUME_SAFE_KEYS` and keys under an `allow` entry (a key or a section)."""
    old, new = _flatten(stored), _flatten(current)
    skip = (*RESUME_SAFE_KEYS, *allow)
    return [
        f"{key}: {old.get(key, '(absent)')!r} → {new.get(key, '(absent)')!r}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key) and not _under_any(key, skip)
    ]


# Multi-distillation: what each student may set for itself. Everything else (crops, data, masks,
# the teacher, the run's length, seed, mesh and outputs) is the run's and must be the same for all:
# the students share one batch, one mask draw and one teacher pass.
PER_STUDENT_KEYS = ("student", "dino", "ibot.loss_weight", "ibot.head_", "optim", "schedules", "teacher")
SHARED_BY_STUDENTS_EXCEPTIONS = ("optim.epochs", "multidistillation")


def _per_student(key: str) -> bool:
    if _under_any(key, SHARED_BY_STUDENTS_EXCEPTIONS):
        return False
    return any(key.startswith(p) if p.endswith("_") else _under_any(key, (p,)) for p in PER_STUDENT_KEYS)


def _unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def student_configs(cfg: Config) -> dict[str, Config]:
    """The config of each student of a multi-distillation run (RECIPE.md §5.8), by name: defaults
    ← the student's file (`multidistillation.students[*].config_path`, a path or a built-in recipe
    name) ← the run's own config, whose keys win as upstream's (a key the run leaves at its default
    does not override the student's). Raises a ConfigError naming the key and the students when
    they disagree on a key they must share."""
    base = cfg.multidistillation
    reference = dataclasses.replace(Config(), schedules=cfg.schedules and type(cfg.schedules)())
    defaults = _flatten(config_to_dict(reference))
    mine = {
        k: v
        for k, v in _flatten(config_to_dict(dataclasses.replace(cfg, multidistillation=type(base)()))).items()
        if k not in defaults or defaults[k] != v
    }
    configs: dict[str, Config] = {}
    for student in base.students:
        try:
            raw, label = _read_mapping(student.config_path)
        except ConfigError as e:
            raise ConfigError(f"multidistillation.students[{student.name}]: {e}") from None
        raw.pop("multidistillation", None)
        ctx = _Context(f"student {student.name} ({label})")
        merged = _merge(Config(), raw, "", ctx)
        own = _flatten(config_to_dict(merged))
        for key in sorted(_flatten(raw).keys() & mine.keys()):
            if own[key] != mine[key]:  # not silent: the student's file asked for something else
                log.warning(
                    "multidistillation.students[%s]: the run's %s=%r overrides the student file's %r "
                    "(the run's keys win, as upstream)",
                    student.name,
                    key,
                    mine[key],
                    own[key],
                )
        ctx.source = "the multi-distillation config"
        merged = _merge(merged, _unflatten(mine), "", ctx)
        try:
            validate(merged)
        except ConfigError as e:
            raise ConfigError(f"multidistillation.students[{student.name}] ({label}): {e}") from None
        configs[student.name] = merged
    flat = {name: _flatten(config_to_dict(c)) for name, c in configs.items()}
    first, *others = flat
    for name in others:
        for key in sorted(flat[first].keys() | flat[name].keys()):
            if not _per_student(key) and flat[first].get(key) != flat[name].get(key):
                raise ConfigError(
                    f"multidistillation: students {first} and {name} differ in {key} "
                    f"({flat[first].get(key)!r} vs {flat[name].get(key)!r}); the students share the batch, the "
                    f"masks, the teacher and the run's length: set {key} once, in the multi-distillation config"
                )
    return configs


@functools.cache
def _all_keys() -> tuple[str, ...]:
    """Every dotted leaf key of the schema (nested dataclasses expanded, optional ones included)."""
    out = []

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            sub = _strip_optional(_hints(cls)[f.name])
            if sub is not None:
                walk(sub, f"{prefix}{f.name}.")
            else:
                out.append(f"{prefix}{f.name}")

    walk(Config, "")
    return tuple(out)


def _warn_no_effect(cfg: Config, ctx: _Context) -> None:
    default = Config()
    seen = set()
    for key in ctx.touched:
        if key in seen:
            continue
        seen.add(key)
        if key in NO_EFFECT_KEYS:
            hint = NO_EFFECT_KEYS[key]
        elif key in CONDITIONAL_NO_EFFECT_KEYS:
            switch, off_when = CONDITIONAL_NO_EFFECT_KEYS[key]
            if getattr(cfg.compat, switch) != off_when:
                continue
            hint = f"as upstream; set compat.{switch}={str(not off_when).lower()} to honour it"
        elif key in V1_SCHEDULE_KEYS and cfg.schedules is not None:
            if get_key(cfg, key) is None:
                continue
            warn_value = get_key(cfg, key)
            log.warning("config key %s=%r has no effect: the schedules section (v2) replaces it", key, warn_value)
            continue
        else:
            continue
        value = get_key(cfg, key)
        if value is not None and value != get_key(default, key):
            log.warning("config key %s=%r has no effect in dinov3-jax%s", key, value, f" ({hint})" if hint else "")
    momentum_set = cfg.train.center_momentum != default.train.center_momentum
    if "train.center_momentum" in seen and momentum_set and cfg.train.centering != "softmax":
        log.warning(
            "train.center_momentum has no effect without train.centering=softmax (Sinkhorn-Knopp keeps no centre)"
        )
    if (
        "crops.gram_teacher_crops_size" in seen
        and cfg.crops.gram_teacher_crops_size is not None
        and not cfg.gram.use_loss
    ):
        log.warning(
            "crops.gram_teacher_crops_size has no effect without gram.use_loss=true (no Gram-teacher crops are made)"
        )
    if cfg.train.checkpointing_full and not cfg.train.checkpointing:
        log.warning("train.checkpointing_full=true has no effect without train.checkpointing=true (as upstream)")
    ragged = [size for size in _sizes(cfg.crops.local_crops_size) if size % max(cfg.student.patch_size, 1)]
    if ragged and {"crops.local_crops_size", "student.patch_size"} & seen:
        log.warning(
            "crops.local_crops_size %s not a multiple of student.patch_size %d: the patch embedding drops the "
            "remainder pixels, as upstream (the official high-resolution stage does this with 168 px)",
            ragged,
            cfg.student.patch_size,
        )
    if ctx.legacy:
        log.warning(
            "ignoring %d keys of older official recipes, which have no effect: %s",
            len(ctx.legacy),
            ", ".join(sorted(set(ctx.legacy))),
        )


# --------------------------------------------------------------------------------------------
# Validation.
# --------------------------------------------------------------------------------------------


def _sizes(value) -> tuple:
    return tuple(value) if isinstance(value, tuple) else (value,)


def validate(cfg: Config) -> None:
    """Raises one ConfigError listing every impossible value, each line naming its key."""
    problems: list[str] = []

    def err(key: str, msg: str):
        problems.append(f"{key}: {msg}")

    def at_least(key: str, lo: float):
        value = get_key(cfg, key)
        if value is not None and value < lo:
            err(key, f"must be ≥ {lo}, got {value}")

    def in_range(key: str, lo: float, hi: float, value=None):
        value = get_key(cfg, key) if value is None else value
        if value is not None and not lo <= value <= hi:
            err(key, f"must be in [{lo}, {hi}], got {value}")

    if not str(cfg.train.output_dir).strip():
        err("train.output_dir", "is empty: a run writes its checkpoints and logs into a folder of its own")

    # Backbone (the arch name and the ViTConfig checks).
    try:
        student_backbone_config(cfg)
    except ConfigError as e:
        problems.append(str(e))
    if cfg.student.arch.startswith("convnext") and not cfg.distillation.enabled:
        err("student.arch", f"a {cfg.student.arch} student trains by distillation only (distillation.enabled=true)")
    if cfg.distillation.enabled and cfg.gram.use_loss:
        err("gram.use_loss", "distillation has no Gram anchoring (the frozen teacher anchors the student)")
    md = cfg.multidistillation
    if md.enabled:
        names = [s.name for s in md.students]
        if not cfg.distillation.enabled:
            err("multidistillation.enabled", "needs distillation.enabled=true and its teacher (distillation.*)")
        if not names:
            err("multidistillation.students", "is empty: list each student's name and config_path")
        for s in md.students:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", s.name):
                err("multidistillation.students", f"name {s.name!r}: use letters, digits, _ . + - (a folder name)")
            if not s.config_path:
                err("multidistillation.students", f"{s.name}: config_path is empty")
        if len(set(names)) < len(names):
            err("multidistillation.students", f"names must differ, got {names}")
        if md.global_batch_size is not None and md.global_batch_size < 1:
            err("multidistillation.global_batch_size", f"must be ≥ 1, got {md.global_batch_size}")
    if cfg.crops.teacher_to_student_resolution_scale <= 0:
        err(
            "crops.teacher_to_student_resolution_scale",
            f"must be > 0, got {cfg.crops.teacher_to_student_resolution_scale}",
        )
    s = cfg.student
    at_least("student.patch_size", 1)
    at_least("student.n_storage_tokens", 0)
    at_least("student.in_chans", 1)
    at_least("student.layerscale", 0)

    # Crops: sizes are multiples of the patch size; multi-resolution lists agree.
    c = cfg.crops
    patch = max(s.patch_size, 1)
    n_res = 1
    for key in ("crops.global_crops_size", "crops.local_crops_size", "crops.gram_teacher_crops_size"):
        value = get_key(cfg, key)
        if value is None:
            continue
        sizes = _sizes(value)
        if not sizes:
            err(key, "is an empty list")
        for size in sizes:
            if size < 1:
                err(key, f"crop sizes must be positive, got {size}")
            elif size % patch and key != "crops.local_crops_size":
                # (Local crops may floor, as in the official high-res stage: see _warn_no_effect.)
                err(key, f"{size} is not a multiple of student.patch_size {s.patch_size}")
        if len(sizes) > 1:
            if n_res > 1 and len(sizes) != n_res:
                err(key, f"has {len(sizes)} resolutions, another crop size list has {n_res}")
            n_res = max(n_res, len(sizes))
    ratios = _sizes(c.global_local_crop_pairs_ratios)
    if n_res > 1 and len(ratios) != n_res:
        err("crops.global_local_crop_pairs_ratios", f"needs one probability per resolution ({n_res}), got {ratios}")
    if any(r < 0 for r in ratios) or (len(ratios) > 1 and not math.isclose(sum(ratios), 1.0, rel_tol=1e-6)):
        err("crops.global_local_crop_pairs_ratios", f"must be probabilities summing to 1, got {ratios}")
    for key in ("crops.global_crops_scale", "crops.local_crops_scale"):
        lo, hi = get_key(cfg, key)
        if not 0 < lo <= hi <= 1:
            err(key, f"must satisfy 0 < min ≤ max ≤ 1, got {[lo, hi]}")
    at_least("crops.local_crops_number", 0)
    bri, con, sat, hue = c.color_jitter
    if min(bri, con, sat) < 0 or not 0 <= hue <= 0.5:
        err(
            "crops.color_jitter",
            f"needs brightness, contrast, saturation ≥ 0 and hue in [0, 0.5], got {c.color_jitter}",
        )
    in_range("crops.color_jitter_prob", 0, 1)
    in_range("crops.grayscale_prob", 0, 1)
    in_range("crops.solarize_prob", 0, 1)
    in_range("train.center_momentum", 0, 1)
    lo, hi = c.blur_sigma
    if not 0 < lo <= hi:
        err("crops.blur_sigma", f"must satisfy 0 < min ≤ max, got {[lo, hi]}")
    if any(v <= 0 for v in c.rgb_std):
        err("crops.rgb_std", f"must be positive, got {c.rgb_std}")

    # Masking and heads.
    lo, hi = cfg.ibot.mask_ratio_min_max
    if not (0 <= lo <= 1 and 0 <= hi <= 1):
        err("ibot.mask_ratio_min_max", f"ratios must be in [0, 1], got {[lo, hi]}")
    elif lo > hi:
        err("ibot.mask_ratio_min_max", f"min > max: {[lo, hi]}")
    in_range("ibot.mask_sample_probability", 0, 1)
    default = Config()
    for key, reason in FIXED_KEYS.items():
        if get_key(cfg, key) != get_key(default, key):
            err(key, f"must be {get_key(default, key)!r} ({reason}), got {get_key(cfg, key)!r}")
    for head in ("dino", "ibot"):
        for key, lo_ in (
            ("head_n_prototypes", 1),
            ("head_bottleneck_dim", 1),
            ("head_hidden_dim", 1),
            ("head_nlayers", 1),
        ):
            at_least(f"{head}.{key}", lo_)
        at_least(f"{head}.loss_weight", 0)
        if get_key(cfg, f"{head}.head_last_layer_init_std") <= 0:
            err(f"{head}.head_last_layer_init_std", "must be > 0")
    at_least("dino.koleo_loss_weight", 0)
    at_least("dino.koleo_distributed_loss_group_size", 1)
    if cfg.dino.koleo_loss_weight > 0 and not cfg.dino.koleo_loss_distributed and cfg.train.batch_size_per_gpu < 2:
        err("train.batch_size_per_gpu", "KoLeo needs at least 2 images per device (or dino.koleo_loss_weight=0)")

    # Gram.
    at_least("gram.loss_weight", 0)
    at_least("gram.update_frequency", 1)
    at_least("gram.it_first_update", 0)
    at_least("gram.max_updates", 0)
    at_least("gram.it_load_ema_teacher", -1)
    gram = cfg.gram
    if gram.remove_neg and gram.remove_only_teacher_neg:
        err("gram.remove_neg", "and gram.remove_only_teacher_neg are exclusive")
    if gram.tokens_used != "all" and gram.img_level:
        err("gram.tokens_used", f"{gram.tokens_used!r} needs batch-level Gram matrices (gram.img_level=false)")
    if gram.use_loss and gram.ema_teacher and c.gram_teacher_crops_size is not None:
        err(
            "crops.gram_teacher_crops_size",
            "must be null with gram.ema_teacher=true (the EMA teacher's own global-crop features are the targets)",
        )

    # Initial weights (chained stages, continued pretraining).
    starts = [
        k
        for k in ("student.resume_from_teacher_chkpt", "student.pretrained_weights", "train.continue_from")
        if get_key(cfg, k)
    ]
    if len(starts) > 1:
        err(starts[0], f"and {', '.join(starts[1:])} both say where the run starts: set one")
    in_range("optim.freeze_backbone_epochs", 0, cfg.optim.epochs)

    # Length, batch, optimizer.
    at_least("train.batch_size_per_gpu", 1)
    at_least("train.grad_accumulation_steps", 1)
    at_least("train.OFFICIAL_EPOCH_LENGTH", 1)
    at_least("train.seed", 0)
    at_least("optim.epochs", 1)
    at_least("optim.clip_grad", 0)
    at_least("optim.patch_embed_lr_mult", 0)
    if not 0 < cfg.optim.layerwise_decay <= 1:
        err("optim.layerwise_decay", f"must be in (0, 1], got {cfg.optim.layerwise_decay}")
    for key in ("optim.adamw_beta1", "optim.adamw_beta2"):
        value = get_key(cfg, key)
        if not 0 <= value < 1:
            err(key, f"must be in [0, 1), got {value}")
    epochs = cfg.optim.epochs

    # Schedules: v1 keys, or the v2 section.
    if cfg.schedules is None:
        for key in V1_SCHEDULE_KEYS:
            if get_key(cfg, key) is None:
                err(key, "is null, which is only allowed when the schedules section (v2) is set")
        for key in ("optim.lr", "optim.min_lr", "optim.weight_decay", "optim.weight_decay_end"):
            at_least(key, 0)
        for key in ("optim.warmup_epochs", "optim.freeze_last_layer_epochs", "teacher.warmup_teacher_temp_epochs"):
            in_range(key, 0, epochs)
        in_range("teacher.momentum_teacher", 0, 1)
        in_range("teacher.final_momentum_teacher", 0, 1)
        for key in ("teacher.teacher_temp", "teacher.warmup_teacher_temp"):
            value = get_key(cfg, key)
            if value is not None and value <= 0:
                err(key, f"must be > 0, got {value}")
    else:
        for name in ("lr", "weight_decay", "momentum", "teacher_temp"):
            entry = getattr(cfg.schedules, name)
            if entry is None:
                err(
                    f"schedules.{name}",
                    "is missing (a schedules section needs lr, weight_decay, momentum and teacher_temp)",
                )
                continue
            _check_entry(entry, f"schedules.{name}", epochs, err, allow_freeze=name == "lr")
            values = (entry.start, entry.peak, entry.end)
            if name == "momentum" and not all(0 <= v <= 1 for v in values):
                err(f"schedules.{name}", f"momentum values must be in [0, 1], got {values}")
            elif name == "teacher_temp" and not all(v > 0 for v in values):
                err(f"schedules.{name}", f"temperatures must be > 0, got {values}")
            elif name in ("lr", "weight_decay") and not all(v >= 0 for v in values):
                err(f"schedules.{name}", f"values must be ≥ 0, got {values}")
    _check_entry(cfg.dino.local_loss_weight_schedule, "dino.local_loss_weight_schedule", epochs, err, False)
    if cfg.gram.loss_weight_schedule is not None:
        _check_entry(cfg.gram.loss_weight_schedule, "gram.loss_weight_schedule", epochs, err, False)

    # Checkpoints and evaluation.
    at_least("checkpointing.period", 1)
    at_least("checkpointing.max_to_keep", 1)
    at_least("checkpointing.keep_every", 1)
    at_least("evaluation.eval_period_iterations", 1)

    # Project sections.
    if cfg.mesh.data != -1 and cfg.mesh.data < 1:
        err("mesh.data", f"must be -1 (all devices) or ≥ 1, got {cfg.mesh.data}")
    at_least("mesh.fsdp", 1)
    dist = cfg.distributed
    at_least("distributed.num_processes", 1)
    if dist.process_id is not None and not 0 <= dist.process_id < (dist.num_processes or dist.process_id + 1):
        err("distributed.process_id", f"must be in [0, num_processes={dist.num_processes}), got {dist.process_id}")
    if not dist.enabled and (dist.coordinator_address or dist.num_processes or dist.process_id is not None):
        err("distributed.enabled", "is false, but coordinator_address/num_processes/process_id are set")
    d = cfg.data
    if d.source in ("folder", "filelist") and not d.path:
        err("data.path", f"must be set for data.source={d.source}")
    if d.val_source in ("folder", "filelist") and not d.val_path:
        err("data.val_path", f"must be set for data.val_source={d.val_source}")
    at_least("data.num_workers", 0)
    for key in ("data.num_samples", "data.synthetic_image_size", "data.knn_train_samples", "data.knn_val_samples"):
        at_least(key, 1)
    at_least("runtime.log_every_steps", 1)
    at_least("runtime.knn_every_steps", 0)
    if not cfg.runtime.knn_k or min(cfg.runtime.knn_k) < 1:
        err("runtime.knn_k", f"needs at least one k ≥ 1, got {list(cfg.runtime.knn_k)}")
    at_least("runtime.eval_batch_size", 1)
    at_least("runtime.max_steps", 1)
    at_least("runtime.nan_max_consecutive", 0)
    if not 0 <= d.max_unreadable_fraction <= 1:
        err("data.max_unreadable_fraction", f"must be in [0, 1], got {d.max_unreadable_fraction}")
    for entry in cfg.runtime.resume_allow_changes:
        if not _under_any(entry, ("run",)) and not any(_under_any(k, (entry,)) for k in _all_keys()):
            err("runtime.resume_allow_changes", f"{entry!r} is neither a config key, a section nor 'run'")

    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def _check_entry(entry: ScheduleEntry, key: str, epochs: int, err, allow_freeze: bool) -> None:
    if entry.warmup_epochs < 0:
        err(f"{key}.warmup_epochs", f"must be ≥ 0, got {entry.warmup_epochs}")
    if entry.cosine_epochs is not None and entry.cosine_epochs < 0:
        err(f"{key}.cosine_epochs", f"must be ≥ 0, got {entry.cosine_epochs}")
    span = entry.warmup_epochs + (entry.cosine_epochs or 0)
    if span > epochs:
        err(key, f"warmup_epochs + cosine_epochs = {span} exceeds optim.epochs = {epochs}")
    if entry.freeze_last_layer_epochs:
        if not allow_freeze:
            err(f"{key}.freeze_last_layer_epochs", "is only meaningful in schedules.lr")
        elif not 0 <= entry.freeze_last_layer_epochs <= epochs:
            err(
                f"{key}.freeze_last_layer_epochs",
                f"must be in [0, optim.epochs={epochs}], got {entry.freeze_last_layer_epochs}",
            )


def validate_for_devices(cfg: Config, n_devices: int) -> None:
    """Checks what depends on the device count (mesh shape, KoLeo groups); raises ConfigError."""
    if n_devices < 1:
        raise ConfigError(f"n_devices must be ≥ 1, got {n_devices}")
    problems = []
    try:
        mesh_shape(cfg, n_devices)
    except ConfigError as e:
        problems.append(str(e))
    n_micro = cfg.train.grad_accumulation_steps
    batch = global_batch_size(cfg, n_devices) // n_micro  # of one micro-batch
    per_device = batch // n_devices
    if global_batch_size(cfg, n_devices) % (n_devices * n_micro):
        problems.append(
            f"multidistillation.global_batch_size: {global_batch_size(cfg, n_devices)} images do not split "
            f"evenly over {n_devices} devices × train.grad_accumulation_steps={n_micro} micro-batches"
        )
    group = cfg.dino.koleo_distributed_loss_group_size
    if cfg.dino.koleo_loss_distributed and group is not None and (group % per_device or batch % group or group < 2):
        problems.append(
            f"dino.koleo_distributed_loss_group_size: {group} must be a multiple of train.batch_size_per_gpu "
            f"({per_device}) and divide the global batch of a micro-batch ({batch} on {n_devices} devices)"
        )
    if problems:
        raise ConfigError("config does not fit the devices:\n  " + "\n  ".join(problems))
