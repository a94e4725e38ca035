"""`lorabatch init`: a commented config file, optionally next to a freshly built demo model."""

from __future__ import annotations

from pathlib import Path

import click

from lorabatch.demo.build import DEMO_ADAPTERS, DEMO_MODEL_DIR, ensure_demo
from lorabatch.schemas.errors import UsageError
from lorabatch.schemas.settings import CONFIG_FILE_NAME

DEMO_ROOT = "demo"
"""Where `init --demo` builds the demo model, relative to the config's folder."""

TEMPLATE = '''\
# lorabatch configuration. Relative paths resolve against this file's folder.

[model]
# A hub id (downloaded once by transformers) or a local directory.
base = "{base}"
# auto: float32 on CPU, bfloat16 (or float16) on GPU.
dtype = "auto"
# auto: cuda when available, else cpu.
device = "auto"

[adapters]
# name -> PEFT adapter directory (or a trainer checkpoint-N folder). These are the only
# adapters a job may name; "base" means the base model alone.
{adapters}

[worker]
# merged: merge each batch's adapter into the base weights; separate: keep adapters apart and
# mix them in one batch; auto: choose per batch.
weights = "auto"
max_batch_size = 32
max_batch_tokens = 16384
max_resident_adapters = 8

[limits]
max_new_tokens = 4096
default_max_new_tokens = 256
max_file_bytes = 2147483648

# [service]
# With no broker URL lorabatch runs an embedded Redis; with no database URL, SQLite. Both live
# in state_dir (default .lorabatch/ beside this file: one queue and database per project).
# LORABATCH_BROKER_URL and LORABATCH_DATABASE_URL
# override these.
# broker_url = "redis://localhost:6379/0"
# database_url = "postgresql+psycopg://lorabatch@localhost/lorabatch"
# state_dir = ".lorabatch"
'''

ADAPTERS_DIR = "adapters"
"""The folder `init` creates for adapter directories, beside lorabatch.toml."""

REFERENCE_ADAPTERS = {
    "sft": "adapters/qwen_lora_adapter",
    "sft-ckpt39": "adapters/qwen_lora_sft/checkpoint-39",
    "dpo-ckpt3": "adapters/dpo_model/checkpoint-3",
    "dpo": "adapters/qwen_lora_dpo_adapter",
}


def render_config(*, base: str, adapters: dict[str, str]) -> str:
    lines = "\n".join(f'{name} = "{path}"' for name, path in adapters.items())
    return TEMPLATE.format(base=base, adapters=lines)


def write_config(directory: Path, *, demo: bool = False, force: bool = False) -> Path:
    """Write DIRECTORY/lorabatch.toml; with `demo`, build the demo model there and point the config at it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CONFIG_FILE_NAME
    if path.exists() and not force:
        raise UsageError(f"{path} already exists; pass --force to overwrite it.")
    if demo:
        root = ensure_demo(directory / DEMO_ROOT, announce=lambda m: click.echo(m, err=True))
        text = render_config(base=f"{DEMO_ROOT}/{DEMO_MODEL_DIR}",
                             adapters={n: f"{DEMO_ROOT}/{p}" for n, p in DEMO_ADAPTERS.items()})
        assert root.exists()
    else:
        text = render_config(base="Qwen/Qwen2.5-1.5B-Instruct", adapters=REFERENCE_ADAPTERS)
    # The config's adapter paths start with adapters/: copy (or link) adapter folders in here.
    (directory / ADAPTERS_DIR).mkdir(exist_ok=True)
    path.write_text(text)
    return path
