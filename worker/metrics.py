"""A worker's Prometheus metrics (prometheus_client), served on [worker] metrics_port when it is set.

One WorkerMetrics per worker process; the worker calls its record methods from any thread (the
client's metrics are thread-safe) and `serve(port)` once. The names, all prefixed `lorabatch_`:

| name | type | labels | meaning |
|---|---|---|---|
| lorabatch_prompt_tokens_total | counter | adapter | prompt tokens of finished requests |
| lorabatch_generated_tokens_total | counter | adapter | tokens generated for finished requests |
| lorabatch_requests_finished_total | counter | state, adapter | requests ended (succeeded, failed, cancelled) |
| lorabatch_decode_steps_total | counter | | decode steps run |
| lorabatch_decode_step_seconds | histogram | | time per decode step (prefill of joining rows included) |
| lorabatch_batch_rows | gauge | | rows in the batch at the last step |
| lorabatch_batch_max_rows | gauge | | max_batch_size |
| lorabatch_batch_fill_ratio | histogram | | rows / max_batch_size per decode step |
| lorabatch_adapter_events_total | counter | kind | adapter loads, evictions, merge switches, load failures |
| lorabatch_db_retries_total | counter | | database transactions retried while the database was unreachable |
| lorabatch_requests_held | gauge | | requests in messages the worker holds, not yet claimed |

Mean batch fill over a window: rate(lorabatch_batch_fill_ratio_sum) / rate(lorabatch_batch_fill_ratio_count).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from lorabatch.schemas.errors import ConfigError

ADAPTER_EVENTS = ("load", "eviction", "merge_switch", "load_failed")
"""The kinds `adapter_event` takes (a closed set, so the label stays small)."""
STEP_SECONDS_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
FILL_BUCKETS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


class WorkerMetrics:
    """The worker's metrics in their own registry (so several can live in one process, as in tests)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.prompt_tokens = Counter("lorabatch_prompt_tokens", "Prompt tokens of finished requests.",
                                     ["adapter"], registry=r)
        self.generated_tokens = Counter("lorabatch_generated_tokens", "Tokens generated for finished requests.",
                                        ["adapter"], registry=r)
        self.finished = Counter("lorabatch_requests_finished", "Requests ended, by final state and adapter.",
                                ["state", "adapter"], registry=r)
        self.steps = Counter("lorabatch_decode_steps", "Decode steps run.", registry=r)
        self.step_seconds = Histogram("lorabatch_decode_step_seconds", "Seconds per decode step.",
                                      buckets=STEP_SECONDS_BUCKETS, registry=r)
        self.batch_rows = Gauge("lorabatch_batch_rows", "Rows in the batch at the last decode step.", registry=r)
        self.batch_max_rows = Gauge("lorabatch_batch_max_rows", "The most rows a batch may hold (max_batch_size).",
                                    registry=r)
        self.batch_fill = Histogram("lorabatch_batch_fill_ratio", "Rows per decode step over max_batch_size.",
                                    buckets=FILL_BUCKETS, registry=r)
        self.adapter_events = Counter("lorabatch_adapter_events", "Adapter loads, evictions and merge switches.",
                                      ["kind"], registry=r)
        self.db_retries = Counter("lorabatch_db_retries", "Transactions retried while the database was unreachable.",
                                  registry=r)
        self.held = Gauge("lorabatch_requests_held", "Requests in held messages, not yet claimed.", registry=r)
        for kind in ADAPTER_EVENTS:  # every kind shows as 0 from the start, so rate() works on the first event
            self.adapter_events.labels(kind=kind)
        self._server = None

    def record_step(self, rows: int, max_rows: int, seconds: float) -> None:
        """One decode step over `rows` rows of at most `max_rows`, taking `seconds`."""
        self.steps.inc()
        self.step_seconds.observe(seconds)
        self.batch_rows.set(rows)
        self.batch_max_rows.set(max_rows)
        if max_rows > 0:
            self.batch_fill.observe(min(rows / max_rows, 1.0))

    def record_finished(self, state: str, adapter: str, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        """A request that ended (state: succeeded, failed or cancelled; adapter: its name or "base")."""
        self.finished.labels(state=state, adapter=adapter).inc()
        if prompt_tokens:
            self.prompt_tokens.labels(adapter=adapter).inc(prompt_tokens)
        if completion_tokens:
            self.generated_tokens.labels(adapter=adapter).inc(completion_tokens)

    def set_held(self, n: int) -> None:
        self.held.set(n)

    def db_retry(self) -> None:
        self.db_retries.inc()

    def adapter_event(self, kind: str) -> None:
        """kind: one of ADAPTER_EVENTS."""
        if kind not in ADAPTER_EVENTS:
            raise ValueError(f"unknown adapter event {kind!r}; one of {', '.join(ADAPTER_EVENTS)}")
        self.adapter_events.labels(kind=kind).inc()

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve /metrics on `port` (0: any free port) in a daemon thread; returns the port bound."""
        self._server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return self._server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def from_settings(settings) -> WorkerMetrics:  # noqa: ANN001  (schemas.settings.Settings)
    """The worker's metrics, served when [worker] metrics_port is set (off when it is None)."""
    metrics = WorkerMetrics()
    port = getattr(settings.worker, "metrics_port", None)
    if port is not None:
        try:
            metrics.serve(port)
        except OSError as e:
            raise ConfigError(f"cannot serve metrics on port {port} ({e.strerror or e}); "
                              "set another [worker] metrics_port, or none to turn metrics off") from e
    return metrics
