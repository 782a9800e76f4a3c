"""Load settings from YAML plus environment overrides, with errors that name key and file.

Order: defaults in the models < the YAML file < `MQI__SECTION__KEY=value`
environment variables (values parsed as YAML, so `MQI__BACKEND__GPUS=[0,1]`
works). The file is `--config PATH`, else `$MQI_CONFIG`, else the working
copy's `config/config.yaml`. A `${NAME}` in a string of the file takes the value
of environment variable NAME (where the tools are installed differs per machine);
an unset one is an error naming the key and the variable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from config.settings import UNECHOED_KEYS, Settings

DEFAULT_CONFIG = Path(__file__).resolve().parent / "config.yaml"
ENV_PREFIX = "MQI__"


class ConfigError(ValueError):
    """Invalid configuration; the message lists every problem with its key and source."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate keys instead of keeping the last one."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} appears twice")
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    if explicit:
        return Path(explicit).expanduser().resolve()
    if os.environ.get("MQI_CONFIG"):
        return Path(os.environ["MQI_CONFIG"]).expanduser().resolve()
    return DEFAULT_CONFIG


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file: {err.strerror}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings")
    return data


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> list[str]:
    """Merge MQI__A__B=value overrides into `data`; return the variable names used."""
    used = []
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        keys = [k.lower() for k in name[len(ENV_PREFIX) :].split("__")]
        if not all(keys):
            raise ConfigError(f"environment variable {name}: empty key segment")
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        target = data
        for key in keys[:-1]:
            child = target.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"environment variable {name}: {key} is not a section")
            target = child
        target[keys[-1]] = value
        used.append(name)
    return used


def _describe(error: ValidationError, source: str, env_used: list[str]) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        else:
            message = item["msg"].removeprefix("Value error, ")
            if "input" in item and not isinstance(item["input"], dict) and key not in UNECHOED_KEYS:
                message += f" (got {item['input']!r})"
        env_name = ENV_PREFIX + "__".join(str(p).upper() for p in item["loc"])
        origin = f"environment {env_name}" if env_name in env_used else source
        lines.append(f"{origin}: {key}: {message}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand(value: Any, env: Mapping[str, str], key: str, missing: list[str]) -> Any:
    """`value` with every `${NAME}` in its strings replaced from `env`; unset names go to `missing`."""
    if isinstance(value, dict):
        return {k: _expand(v, env, f"{key}.{k}" if key else str(k), missing) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, env, f"{key}[{i}]", missing) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in env:
            missing.append(f"{key}: environment variable {name} is not set")
            return match.group(0)
        return env[name]

    return _ENV_REFERENCE.sub(substitute, value)


def load_settings(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Read, merge and validate the settings; raise ConfigError naming every bad key."""
    source = config_path(path)
    environment = os.environ if env is None else env
    missing: list[str] = []
    data = _expand(_read_yaml(source), environment, "", missing)
    if missing:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(f"{source}: {m}" for m in missing))
    env_used = _apply_env(data, environment)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, str(source), env_used)) from None
    settings._source = source
    return settings
