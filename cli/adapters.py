"""`lorabatch adapters [--check]`: list configured adapters; with --check, validate each against the base model."""

from __future__ import annotations

import click

from lorabatch.schemas.settings import Settings


def show_adapters(settings: Settings, *, check: bool) -> bool:
    """Print one line per adapter. Returns False when --check found a problem."""
    if not settings.adapters:
        click.echo("no adapters configured; add them under [adapters] in lorabatch.toml")
        return True
    if not check:
        for name in settings.adapters:
            path = settings.adapter_dir(name)
            click.echo(f"{name:<16} {path}{'' if path.exists() else '  (missing)'}")
        return True
    try:
        from lorabatch.worker.engine.adapters import AdapterManager
    except ImportError as e:
        from lorabatch.schemas.errors import UsageError

        raise UsageError(f"--check needs the worker extra ({e.name} is missing): pip install 'lorabatch[worker]'") from e
    ok = True
    manager = AdapterManager.from_settings(settings)
    for name in settings.adapters:
        info = manager.check(name)
        if info.get("problem"):
            ok = False
            click.echo(f"{name:<16} PROBLEM: {info['problem']}")
        else:
            targets = info["targets"] if isinstance(info["targets"], str) else ",".join(info["targets"])
            click.echo(f"{name:<16} r={info['rank']} alpha={info['alpha']} targets={targets} "
                       f"size={info['size_bytes'] / 1e6:.1f}MB  {info['path']}")
    return ok
