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


JOB_HELP = "JOB is a job's id, a unique prefix of its id, or its name."


def client_of(click_ctx: click.Context):
    """The Python client over this invocation's Context: the commands and the client are one code path."""
    from lorabatch.client import Client

    return Client(context=context_of(click_ctx))


def echo_json(data) -> None:
    click.echo(json.dumps(data, indent=None, default=str))
