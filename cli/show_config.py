"""`lorabatch config`: the settings in force as a TOML file that loads back as a configuration.

Generic over the settings' fields: a nested section model is a `[table]`, a dict (adapters) a
`[table]` of its keys, the remaining top-level fields `[service]`. None means "not set" and is
left out (TOML has no null). Fields marked internal (schemas.settings.INTERNAL: test and benchmark
knobs) are left out while they hold their default. It knows nothing of what each field means.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from pydantic import BaseModel

from lorabatch.schemas.settings import Settings, hide_password

NOT_PRINTED = {"config_path"}
"""Where the settings were read from: a comment, never a setting (loading it back would move the project)."""
BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def settings_toml(settings: Settings) -> str:
    """The settings as TOML, passwords hidden (a hidden password loads back as the text `***`)."""
    where = (f"# read from {settings.config_path}; relative paths resolve against its folder"
             if settings.config_path else "# no lorabatch.toml found: built-in defaults and the environment")
    lines = [where, f"# state directory: {settings.state_path}", ""]
    service: dict[str, Any] = {}
    for name in type(settings).model_fields:
        if name in NOT_PRINTED:
            continue
        value = getattr(settings, name)
        if isinstance(value, BaseModel):
            lines += _table(name, _shown_fields(value))
        elif isinstance(value, dict):
            lines += _table(name, value)
        elif value is not None:
            service[name] = hide_password(value) if name.endswith("_url") else value
    lines += _table("service", service)
    embedded = [f"# {name} unset: the {what} in the state directory" for name, what in
                (("broker_url", "embedded Redis"), ("database_url", "SQLite database")) if name not in service]
    lines[-1:-1] = embedded
    return "\n".join(lines).rstrip("\n") + "\n"


def _shown_fields(section: BaseModel) -> dict[str, Any]:
    shown = {}
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get("internal") and value == field.default:
            continue
        shown[name] = value
    return shown


def _table(name: str, values: dict[str, Any]) -> list[str]:
    body = [f"{_key(k)} = {_value(v)}" for k, v in values.items() if v is not None]
    return [f"[{name}]", *body, ""]


def _key(key: str) -> str:
    return key if BARE_KEY.match(key) else json.dumps(key)


def _value(value: Any) -> str:
    """One TOML value. JSON's string escapes are all valid in TOML basic strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items() if v is not None) + " }"
    if isinstance(value, BaseModel):
        return _value(value.model_dump(mode="json"))
    if hasattr(value, "value") and isinstance(value.value, (str, int)):  # an Enum
        return _value(value.value)
    return json.dumps(str(value))
