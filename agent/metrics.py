"""Prometheus metrics, off by default; when on, served on localhost unless configured.

Labels hold only what the host itself bounds: template names, outcomes and
reason codes. Never an identity, a parameter value or a name a caller made up,
which would also let any caller grow the label set without end.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from cmdgate import __version__
from cmdgate.agent.runner import RunOutcome

log = logging.getLogger("cmdgate.agent")


@dataclass
class Metrics:
    """The agent's metrics, in a registry of their own."""

    registry: CollectorRegistry
    runs: Counter
    duration: Histogram
    denials: Counter
    in_flight: Gauge
    http: WSGIServer | None = None
    port: int = 0

    @classmethod
    def create(cls) -> Metrics:
        registry = CollectorRegistry()
        Info("cmdgate_build", "cmdgate version", registry=registry).info({"version": __version__})
        return cls(
            registry,
            Counter(
                "cmdgate_runs",
                "Runs that ended, by template and outcome",
                ["command", "outcome"],
                registry=registry,
            ),
            Histogram(
                "cmdgate_run_duration_seconds",
                "How long runs took, by template",
                ["command"],
                registry=registry,
                buckets=(
                    0.005,
                    0.01,
                    0.025,
                    0.05,
                    0.1,
                    0.25,
                    0.5,
                    1,
                    2.5,
                    5,
                    10,
                    30,
                    60,
                    300,
                    1800,
                    3600,
                ),
            ),
            Counter(
                "cmdgate_denials", "Calls refused, by reason code", ["reason"], registry=registry
            ),
            Gauge("cmdgate_runs_in_flight", "Runs now running", registry=registry),
        )

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics over HTTP (a thread of its own); returns the bound port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        self.http = server
        self.port = int(server.server_address[1])
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def close(self) -> None:
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()

    def run_ended(self, command: str, outcome: RunOutcome | None) -> None:
        self.runs.labels(command=command, outcome=outcome_label(outcome)).inc()
        if outcome is not None:
            self.duration.labels(command=command).observe(outcome.duration_ms / 1000)


def outcome_label(outcome: RunOutcome | None) -> str:
    """One word for how a run ended."""
    if outcome is None:
        return "not_started"
    if outcome.timed_out:
        return "timed_out"
    if outcome.truncated:
        return "truncated"
    if outcome.cancelled:
        return "cancelled"
    if outcome.signal is not None:
        return "signal"
    return "exit_zero" if outcome.exit_code == 0 else "exit_nonzero"
