"""Load a config from YAML plus ``--set key=value`` overrides; fingerprint its identity."""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from steadytrain.config.errors import ConfigError
from steadytrain.config.models import Config, redact_secrets


def load_config(path: str | Path | None, *, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read ``path`` (YAML; None means all defaults), apply dotted overrides, validate.

    Override values are parsed as YAML, so ``model.kwargs={width: 64}`` and ``train.lr=3e-4``
    both work.

    Raises:
        ConfigError: one line naming the file, key or value at fault and how to fix it.
    """
    raw: dict[str, Any] = {} if path is None else _read_yaml_mapping(Path(path))
    for override in overrides:
        _apply_override(raw, override)
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Validate a plain mapping into a ``Config``.

    Raises:
        ConfigError: for the first problem pydantic reports (and a count of the rest).
    """
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_describe_validation_error(error)) from None


def dump_config(config: Config) -> str:
    """The resolved config as YAML, loadable again with ``load_config``; secrets redacted."""
    return yaml.safe_dump(_dump_redacted(config), sort_keys=False)


def _dump_redacted(config: BaseModel) -> dict[str, Any]:
    dumped: dict[str, Any] = {}
    for name, field in type(config).model_fields.items():
        value = getattr(config, name)
        if isinstance(value, BaseModel):
            dumped[name] = _dump_redacted(value)
        elif _is_secret(field.json_schema_extra):
            dumped[name] = redact_secrets(_jsonable(value))
        else:
            dumped[name] = _jsonable(value)
    return dumped


def _is_secret(extra: Any) -> bool:
    return isinstance(extra, dict) and bool(extra.get("secret"))


def identity_fields(config: BaseModel) -> dict[str, Any]:
    """The identity fields of ``config`` as ``{"dotted.name": json_value}``."""
    return _fields(config, identity=True, prefix="")


def operational_fields(config: BaseModel) -> dict[str, Any]:
    """The operational (non-identity) fields of ``config`` as ``{"dotted.name": json_value}``."""
    return _fields(config, identity=False, prefix="")


def _fields(config: BaseModel, *, identity: bool, prefix: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name, field in type(config).model_fields.items():
        value = getattr(config, name)
        dotted = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            found.update(_fields(value, identity=identity, prefix=f"{dotted}."))
            continue
        extra = field.json_schema_extra
        is_identity = isinstance(extra, dict) and bool(extra.get("identity"))
        if is_identity == identity and not _is_secret(extra):  # secrets are never recorded
            found[dotted] = _jsonable(value)
    return found


def check_allowed_changes(config: Config, fields: list[str]) -> tuple[str, ...]:
    """The identity fields that ``--allow-change`` names, checked and without repeats.

    Raises:
        ConfigError: a name that is not an identity field of the config.
    """
    identity, operational = identity_fields(config), operational_fields(config)
    for field in fields:
        if field in operational:
            raise ConfigError(
                f"--allow-change {field}: not an identity field; operational fields may change "
                "on resume without it"
            )
        if field not in identity:
            raise ConfigError(
                f"--allow-change {field}: no such identity field; identity fields are "
                + ", ".join(sorted(identity))
            )
    return tuple(dict.fromkeys(fields))


def identity_fingerprint(config: Config) -> str:
    """A short stable hash of the identity fields: equal iff the run's math is equal."""
    canonical = json.dumps(identity_fields(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def field_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Fields whose value differs between two field mappings, as ``{key: (old, new)}``, sorted.

    A field one side does not record (it was added, or removed, between the versions that
    wrote them) counts as holding its default there: a checkpoint from before a new field
    existed matches a config that leaves the field at its default.
    """
    defaults = _default_fields()
    changes = {}
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, defaults.get(key)), new.get(key, defaults.get(key))
        if before != after:
            changes[key] = (before, after)
    return changes


@functools.cache
def _default_fields() -> dict[str, Any]:
    defaults = Config()
    return {**identity_fields(defaults), **operational_fields(defaults)}


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> list[str]:
    """``key: old -> new`` lines for what ``field_changes`` returned."""
    return [f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items()]


def identity_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two identity-field mappings."""
    return describe_changes(field_changes(old, new))


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats such as ``3e-4`` as numbers, not strings."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12Loader)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=_plain))


def _plain(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else list(value)


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(
            f"config file {path} not found; pass the path of a YAML config such as "
            "examples/tiny.yaml"
        )
    try:
        loaded = _parse_yaml(path.read_text())
    except yaml.MarkedYAMLError as error:
        mark, context = error.problem_mark, error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        if context is not None and error.context:
            where += f" ({error.context} started at line {context.line + 1})"
        raise ConfigError(
            f"{path}: malformed YAML{where}: {error.problem}; fix the syntax and retry"
        ) from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not readable as YAML ({error}); fix the file") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of keys (seed:, train:, ...), "
            f"not a {type(loaded).__name__}"
        )
    return loaded


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, separator, text = override.partition("=")
    key = key.strip()
    if not separator or not key:
        raise ConfigError(
            f"--set {override!r}: expected key=value, for example --set train.lr=3e-4"
        )
    try:
        value = _parse_yaml(text) if text.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(
            f"--set {key}: the value {text!r} is not valid YAML ({_first_line(error)}); "
            "quote it or fix it"
        ) from None
    parts = key.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            parent = ".".join(parts[: depth + 1])
            raise ConfigError(
                f"--set {key}: {parent} is a value, not a section; set {parent} directly"
            )
        node = child
    node[parts[-1]] = value


def _describe_validation_error(error: ValidationError) -> str:
    problems = error.errors()
    first = problems[0]
    location = ".".join(str(part) for part in first["loc"]) or "config"
    if first["type"] == "extra_forbidden":
        message = f"{location}: unknown key; {_known_keys_hint(first['loc'])}"
    elif first["type"] == "value_error":
        # Our own validators' messages; the input is not echoed (it may hold a secret).
        message = f"{location}: {str(first['msg']).removeprefix('Value error, ')}"
    else:
        message = f"{location}: {first['msg']} (got {first.get('input')!r})"
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more problem(s))"
    return message


def _known_keys_hint(location: tuple[Any, ...]) -> str:
    model: type[BaseModel] = Config
    for part in location[:-1]:
        annotation = model.model_fields[str(part)].annotation if isinstance(part, str) else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return "check the spelling against examples/tiny.yaml"
        model = annotation
    section = ".".join(str(part) for part in location[:-1]) or "the top level"
    return f"known keys in {section}: {', '.join(model.model_fields)}"


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
