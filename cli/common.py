"""What every command shares: the settings and connections of one invocation, and JSON output."""

from __future__ import annotations

import json

import click

from lorabatch.schemas.settings import load_settings
from lorabatch.store.context import Context


def context_of(click_ctx: click.Context) -> Context:
    """The Context of this invocation, made on first use from --config (closed when the command ends)."""
    obj = click_ctx.find_root().obj
    if isinstance(obj, Context):
        return obj
    ctx = Context(load_settings(obj.get("config")))
    click_ctx.find_root().obj = ctx
    click_ctx.call_on_close(ctx.close)
    return ctx


def echo_json(data) -> None:
    click.echo(json.dumps(data, indent=None, default=str))
