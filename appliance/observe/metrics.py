"""Metrics in the Prometheus text format (version 0.0.4).

Two sources: counters and latency histograms kept by the running server (associations,
DIMSE requests and DICOMweb requests by service and outcome, DICOMweb responses by route
and status, instances and bytes in and out), and gauges read
off the health summary (contents, tier usage, jobs, holds, damaged versions, scrub and
replication state, the audit trail, alarms). `serve` answers GET /metrics on
`metrics.port` (loopback by default); `appliance metrics --textfile FILE` writes the
gauges for node_exporter's textfile collector (from a timer, without the server).
"""

from __future__ import annotations

import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable

PREFIX = "pacs_vault_"
# Seconds: a C-FIND answers in milliseconds, a C-STORE of a CT in tens, a C-GET of a study in seconds.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    escaped = (f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(10), "").replace(chr(34), chr(92) + chr(34))}"'
               for k, v in sorted(labels.items()))
    return "{" + ",".join(escaped) + "}"


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    return "+Inf" if value == math.inf else repr(float(value))


def family(name: str, kind: str, help_text: str, samples: Iterable[tuple[dict, float]]) -> str:
    """One metric family: HELP, TYPE and its samples."""
    lines = [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} {kind}"]
    lines += [f"{PREFIX}{name}{_labels(labels)} {_number(value)}" for labels, value in samples]
    return "\n".join(lines) + "\n"


class ServerMetrics:
    """What the server counts while it runs. Thread-safe."""

    COUNTERS = {
        "associations_total": "Associations requested, by outcome (accepted, rejected).",
        "dropped_connections_total": "Connections dropped before an association (junk, slow, silent, too many).",
        "requests_total": "DIMSE requests served, by service and outcome (success, failure, refused).",
        "stored_instances_total": "Instances stored (new bytes; duplicates not included).",
        "duplicate_instances_total": "Instances received again with the same bytes.",
        "received_bytes_total": "Bytes of instances stored over DICOM.",
        "sent_instances_total": "Instances sent by C-GET and C-MOVE.",
        "transcoded_instances_total": "Instances sent by C-GET and C-MOVE in another syntax than stored, by pair.",
        "http_responses_total": "DICOMweb responses, by route (its template: no UID) and HTTP status.",
    }

    def __init__(self):
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple, float]] = {name: {} for name in self.COUNTERS}
        self._histograms: dict[tuple, list] = {}  # (service,) -> [bucket counts..., sum, count]

    def add(self, name: str, value: float = 1, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._counters[name]
            series[key] = series.get(key, 0) + value

    def observe(self, service: str, seconds: float, outcome: str) -> None:
        """A request finished: count it and its duration."""
        self.add("requests_total", service=service, outcome=outcome)
        with self._lock:
            row = self._histograms.setdefault((service,), [0] * (len(BUCKETS) + 2))
            for number, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    row[number] += 1
            row[-2] += seconds
            row[-1] += 1

    def render(self) -> str:
        with self._lock:
            counters = {name: dict(series) for name, series in self._counters.items()}
            histograms = {key: list(row) for key, row in self._histograms.items()}
        out = [family(name, "counter", self.COUNTERS[name], ((dict(k), v) for k, v in sorted(series.items())))
               for name, series in counters.items()]
        samples = []
        for (service,), row in sorted(histograms.items()):
            for bound, count in zip(BUCKETS + (math.inf,), row[:len(BUCKETS)] + [row[-1]]):
                samples.append(({"service": service, "le": _number(float(bound))}, count))
        lines = [f"# HELP {PREFIX}request_duration_seconds Time to serve a DIMSE or DICOMweb request, by service.",
                 f"# TYPE {PREFIX}request_duration_seconds histogram"]
        for labels, count in samples:
            lines.append(f"{PREFIX}request_duration_seconds_bucket{_labels(labels)} {count}")
        for (service,), row in sorted(histograms.items()):
            lines.append(f'{PREFIX}request_duration_seconds_sum{{service="{service}"}} {_number(float(row[-2]))}')
            lines.append(f'{PREFIX}request_duration_seconds_count{{service="{service}"}} {row[-1]}')
        out.append("\n".join(lines) + "\n")
        return "".join(out)


class MetricsEndpoint:
    """GET /metrics on (address, port): the server's counters and the health gauges (read at
    most every `cache_s` seconds: the health summary scans the index)."""

    def __init__(self, address: str, port: int, server_metrics: ServerMetrics, read_gauges: Callable[[], str],
                 cache_s: float = 15.0):
        """`read_gauges()`: the health gauges as text (observe.health.gauges of a fresh summary)."""
        self._server_metrics = server_metrics
        self._read_gauges = read_gauges
        self._cache_s = cache_s
        self._cached: tuple[float, str] = (0.0, "")
        self._lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = endpoint.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # scrapes are not worth a log line each
                pass

        self.httpd = ThreadingHTTPServer((address, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]

    def render(self) -> str:
        with self._lock:
            at, gauges = self._cached
            if time.monotonic() - at > self._cache_s:
                try:
                    gauges = self._read_gauges()
                except Exception:  # noqa: BLE001 - a scrape must say "down", not fail
                    gauges = family("up", "gauge", "1: the archive could be read for this scrape.", [({}, 0)])
                self._cached = (time.monotonic(), gauges)
        return self._server_metrics.render() + gauges

    def start(self) -> None:
        threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
