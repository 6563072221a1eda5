"""Prometheus metrics of the server, in a registry of its own (several servers can share a process,
as the tests do) and optionally exposed over HTTP.

Names (all prefixed ``genrec_``):
- ``requests_total{method, code}``: finished RPCs by gRPC status name (OK, INVALID_ARGUMENT, ...).
- ``request_latency_seconds{method}``: receive → last byte handed to gRPC.
- ``queue_latency_seconds``: enqueue → the request's batch starts computing.
- ``compute_latency_seconds``: one batch on the model thread.
- ``batch_size``: requests per computed batch.
- ``queue_depth``: requests waiting now.

Example::

    >>> m = Metrics()
    >>> m.requests.labels(method="Recommend", code="OK").inc()
    >>> m.start_http(port=9100)   # GET http://127.0.0.1:9100/metrics
"""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Sub-millisecond to seconds: CPU batches take 1-100 ms, queueing under overload far longer.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self._http: WSGIServer | None = None
        r = self.registry
        self.requests = Counter("genrec_requests", "Finished RPCs by method and gRPC status.",
                                ["method", "code"], registry=r)
        self.request_latency = Histogram("genrec_request_latency_seconds", "RPC latency, receive to reply.",
                                         ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_latency = Histogram("genrec_queue_latency_seconds", "Time a request waits for its batch.",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.compute_latency = Histogram("genrec_compute_latency_seconds", "Model time of one batch.",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("genrec_batch_size", "Requests per computed batch.",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("genrec_queue_depth", "Requests waiting for a batch.", registry=r)
        self.kv_cache_events = Counter("genrec_kv_cache", "KV-cache lookups and evictions: hits, misses, evictions.",
                                       ["event"], registry=r)
        self.kv_cache_bytes = Gauge("genrec_kv_cache_bytes", "Bytes of keys and values held by the KV cache.",
                                    registry=r)

    def start_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Serves /metrics on ``host:port`` (0: any free port) from a daemon thread; returns the port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
