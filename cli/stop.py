"""`lorabatch stop`: stop the project's embedded Redis, which otherwise outlives every lorabatch process.

The embedded Redis (store.broker.ensure_embedded_redis) is started by the first command that needs
it and left running for the others of the project. Nothing can tell from inside one process that it
is the last user, so stopping it is this explicit command (and `lorabatch demo` stops the one it
started). It knows nothing of external Redis servers: with a broker URL set there is nothing to stop.
"""

from __future__ import annotations

from pathlib import Path

import click

from lorabatch.cli.common import context_of
from lorabatch.schemas.errors import UsageError
from lorabatch.schemas.settings import Settings, hide_password
from lorabatch.store import broker

SOCKET_NAME = "redis.sock"
"""The embedded Redis's socket in the state directory (as ensure_embedded_redis writes it)."""


def embedded_redis_info(state_dir: Path) -> dict | None:
    """The embedded Redis of `state_dir` as its INFO says (pid, clients), or None when none answers there."""
    import redis

    sock = state_dir / SOCKET_NAME
    if not sock.exists():
        return None
    try:
        client = redis.Redis(unix_socket_path=str(sock), socket_timeout=2)
        return {**client.info("server"), **client.info("clients")}
    except (redis.RedisError, OSError):
        return None


def stop_project_redis(settings: Settings, *, force: bool) -> str:
    """Stop the embedded Redis of these settings' state directory; the line to print. UsageError while
    other processes (workers, a beat) are connected to it, unless `force`."""
    if settings.broker_url:
        return (f"this project uses the Redis at {hide_password(settings.broker_url)}, not an embedded one; "
                "nothing to stop")
    state = settings.state_path
    info = embedded_redis_info(state)
    if info is None:
        return f"no embedded Redis runs for {state}"
    others = int(info.get("connected_clients", 1)) - 1  # this command's own connection is one
    if others > 0 and not force:
        raise UsageError(f"the embedded Redis of {state} still has {others} client connection(s) (a worker, beat or "
                         "status --watch); stop them first, or pass --force to stop it anyway.")
    broker.stop_embedded_redis(state)
    return (f"stopped the embedded Redis of {state} (pid {info.get('process_id')}); queued work is kept in its "
            "append-only file and the database, and the next lorabatch command starts it again")


@click.command("stop")
@click.option("--force", is_flag=True, help="Stop it even while workers or other processes are connected.")
@click.pass_context
def stop_command(click_ctx, force) -> None:
    """Stop this project's embedded Redis (it keeps running after every lorabatch process exits)."""
    click.echo(stop_project_redis(context_of(click_ctx).settings, force=force))
