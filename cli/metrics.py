"""`lorabatch metrics`: the job counters in SQL as Prometheus metrics (producer.metrics)."""

from __future__ import annotations

import time

import click

from lorabatch.cli.common import context_of
from lorabatch.schemas.errors import UsageError


@click.command("metrics")
@click.option("--serve", "port", type=int, help="Serve /metrics on this port until stopped.")
@click.option("--addr", default="0.0.0.0", show_default=True, help="Address to listen on with --serve.")
@click.pass_context
def metrics_command(click_ctx, port, addr) -> None:
    """Print the job counters (jobs per state, queue depth per job and priority) for Prometheus, or
    serve them with --serve PORT."""
    from prometheus_client import generate_latest, start_http_server

    from lorabatch.producer.metrics import job_registry

    ctx = context_of(click_ctx)
    ctx.engine  # noqa: B018  (connect now: a bad URL or schema fails here, with its one-line message)
    registry = job_registry(ctx)
    if port is None:
        click.echo(generate_latest(registry).decode(), nl=False)
        return
    try:
        server, _thread = start_http_server(port, addr=addr, registry=registry)
    except OSError as e:
        raise UsageError(f"cannot serve metrics on {addr}:{port} ({e.strerror or e}); choose another --serve port") from e
    click.echo(f"serving job metrics on http://{addr}:{server.server_port}/metrics (Ctrl-C to stop)", err=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.shutdown()
