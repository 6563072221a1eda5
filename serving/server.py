"""The gRPC server: ``genrec.v1.RecommenderService`` over a dynamic batcher, plus health, reflection
and Prometheus metrics.

Lifecycle: the export is read and checked first, so a missing or malformed one fails before the port
opens; then the port opens with health NOT_SERVING while the model is built and warmed up off the
event loop; then health turns SERVING. On SIGTERM (or SIGINT) health turns NOT_SERVING,
new RPCs are refused, in-flight ones get ``grace_s`` seconds to finish, then the process exits 0.

Run it::

    python -m serving.server --artifact runs/latest/export --port 50051 --metrics-port 9100

or embed it (tests do)::

    >>> server = RecommenderServer(ServerConfig(artifact=Path("runs/latest/export"), port=0))
    >>> port = await server.start()       # returns once SERVING
    >>> await server.shutdown()
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import torch
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from data.splits import SeenItems
from protos.genrec.v1 import recommender_pb2 as pb
from protos.genrec.v1 import recommender_pb2_grpc as pb_grpc
from serving import flags
from serving.appended import AppendedEvents, AppendLimits
from serving.artifact import Artifact, load_artifact
from serving.batcher import BatcherConfig, DeadlineExpired, DynamicBatcher, QueueFull
from serving.catalogue import Catalogue
from serving.engine import Engine
from serving.index import IndexConfig
from serving.metrics import Metrics
from serving.validation import (
    InvalidRequest,
    RequestLimits,
    parse_append,
    parse_generate,
    parse_request,
    parse_search,
)
from serving.work import Beam, BeamStep, Decode, Prefill, Query, Recommendation, Score, Work

log = logging.getLogger("serving")

OVERLOADED = "server overloaded: the request queue is full; retry with backoff"
TOO_MANY_GENERATIONS = "server busy: {} of {} generations in progress; retry with backoff"

STOP_BACKSTOP_S = 5.0
"""How long after the grace period gRPC's own shutdown timer would cancel what is left (see shutdown)."""

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RecommenderService"].full_name
"""``genrec.v1.RecommenderService``: the health-check and reflection name of the service."""


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``python -m serving.server`` takes as flags.

    Attributes:
        artifact: the export directory (``serving.artifact``).
        host: address to bind; loopback unless told otherwise.
        port: 0 picks a free port (``start`` returns it).
        metrics_port: Prometheus /metrics on ``host``; None disables it, 0 picks a free port.
        batcher: max batch size, max queue delay, queue bound.
        grace_s: how long in-flight RPCs may take to finish on shutdown.
        max_message_bytes: transport limit of one message (gRPC answers RESOURCE_EXHAUSTED above it);
            ``max_request_bytes`` is the smaller application limit (INVALID_ARGUMENT above it). Each RPC in
            progress holds at most one such message, raw and parsed: with ``max_concurrent_rpcs``, ~512 MiB
            at most by default.
        max_request_bytes: largest request ``serving.validation`` accepts.
        keepalive_time_s: ping a connection idle this long, so dead peers are noticed.
        keepalive_timeout_s: drop it when a ping is not answered this fast.
        min_client_ping_interval_s: clients pinging more often than this are told to go away.
        tls_cert, tls_key: PEM files; both set serves TLS, neither serves plaintext.
        max_unrequested_rpcs: RPCs gRPC core may hold before the event loop takes them.
        max_concurrent_rpcs: RPCs in progress at once (streams and health watches included); one more
            is refused at arrival with RESOURCE_EXHAUSTED by gRPC itself, before its message is read:
            what the server holds (memory, event-loop time) stays bounded however many calls arrive. The
            default is a batch computing and a full queue behind it (2 x 32): past that a call could only
            be refused by the queue, in Python, which under 4x overload on 2 cores took the model's CPU
            (goodput 31% of saturation at 128, 60-64% at 48-64: docs/benchmarks.md). Generate streams
            hold a slot each while they run.
        torch_threads: intra-op threads of the model (the event loop needs a core too).
        device: "cpu" or "cuda".
        kv_cache_mb: per-user KV cache (HSTU) of this many MiB; 0 computes every history in full.
        prefill_chunk_tokens: with the cache, a history is computed at most this many tokens per
            model step, so a long one is prefilled over several steps beside short requests.
        cuda_graphs: replay decode steps and known users' one-event updates as CUDA graphs (CUDA only;
            eager elsewhere).
        exclude_seen: which of a user's items are never recommended (``data.splits.SeenItems``); None:
            the export's rule, the one its run was evaluated with.
        max_id_chars: longest user_id accepted (it keys server-side state).
        max_generations: Generate streams in progress at once, a beam search counting as its beam_width
            (each beam is a sequence extended every step); one more is refused at arrival with
            RESOURCE_EXHAUSTED. Bounds the generation work of every model step.
        max_generate_items: most num_items of one Generate.
        max_beam_work: most beam_width x num_items of one beam search.
        append_events: serve AppendEvents. It writes server-side state for any user_id and the server
            authenticates no caller: keep it on only where every caller that can reach the port is
            trusted to write users' histories (the README's "Trust boundary").
        max_appended_users, max_appended_events: what AppendEvents may keep (``AppendLimits``).
        appended_events: the SQLite file AppendEvents writes through (``serving.appended``), so a
            restart loses none of them; None: ``appended-events.sqlite`` beside the export's folder;
            ":memory:" keeps them in this process only.
        ready_file: once SERVING, write ``{"host", "port", "metrics_port"}`` here as JSON, atomically, so a
            launcher that asked for port 0 learns the bound ports without parsing the log.
        index: the item index of retrieval (``serving.index``): exact by default; IVF or HNSW propose a
            FAISS shortlist that is re-scored exactly. Built before SERVING; its knobs are checked
            against the export before the port opens.
    """

    artifact: Path
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int | None = None
    batcher: BatcherConfig = field(default_factory=BatcherConfig)
    grace_s: float = 10.0
    max_message_bytes: int = 2 << 20
    max_request_bytes: int = 1 << 20
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    min_client_ping_interval_s: float = 10.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_unrequested_rpcs: int = 10_000
    max_concurrent_rpcs: int = 64
    torch_threads: int = 1
    device: str = "cpu"
    kv_cache_mb: float = 0.0
    prefill_chunk_tokens: int = 64
    cuda_graphs: bool = False
    max_id_chars: int = 128
    exclude_seen: SeenItems | None = None
    max_generations: int = 32
    max_generate_items: int = 1_000
    max_beam_work: int = 4_096
    append_events: bool = True
    max_appended_users: int = AppendLimits.max_users
    max_appended_events: int = AppendLimits.max_events
    appended_events: Path | str | None = None
    ready_file: Path | None = None
    index: IndexConfig = field(default_factory=IndexConfig)

    def appended_events_path(self) -> Path | str:
        return self.appended_events or Path(self.artifact).resolve().parent / "appended-events.sqlite"

    def grpc_options(self) -> list[tuple[str, int]]:
        ms = lambda s: int(s * 1000)
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", ms(self.keepalive_time_s)),
            ("grpc.keepalive_timeout_ms", ms(self.keepalive_timeout_s)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", ms(self.min_client_ping_interval_s)),
            ("grpc.http2.max_ping_strikes", 2),
            # gRPC sets SO_REUSEPORT by default, which lets a second server bind a busy port silently.
            ("grpc.so_reuseport", 0),
            # RPCs gRPC core holds until the event loop picks them up. Past the limit core sheds them,
            # which clients of this gRPC version see as CANCELLED; set high so that load is shed by
            # the request queue instead, with RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED.
            ("grpc.server.max_pending_requests", self.max_unrequested_rpcs),
            ("grpc.server.max_pending_requests_hard_limit", self.max_unrequested_rpcs),
        ]


class Rejected(Exception):
    """A request answered with a non-OK status before or instead of computing it."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Loaded:
    """What the RPC handlers use once the model is up (``RecommenderServer._load`` sets it, once).

    Attributes:
        catalogue: raw ids, titles and the known users' histories.
        batcher: the queue in front of the engine's model thread.
        limits: bounds on one request, the sequence limit the model's.
        version: the export's model version, sent with every answer.
        use_cache: Recommend through Prefill + Score work items (a KV cache is on).
        use_prefix_states: the model keeps prefix states (HSTU): Generate works.
        device: the engine's: where Generate's sampling noise is drawn.
        prefill_chunk: most history tokens a Prefill computes in one model step.
    """

    catalogue: Catalogue
    batcher: DynamicBatcher[Work, object]
    limits: RequestLimits
    version: str
    use_cache: bool
    use_prefix_states: bool
    device: torch.device
    prefill_chunk: int


class RecommenderServicer(pb_grpc.RecommenderServiceServicer):
    """The RPC handlers: validate, submit to the batcher, turn dense ids back into raw ones. Until the
    model is loaded (``loaded`` is None) every RPC gets UNAVAILABLE."""

    def __init__(self, metrics: Metrics, *, append_events: bool = True, max_generations: int = 32):
        self.metrics = metrics
        self.append_events, self.max_generations = append_events, max_generations
        self.loaded: Loaded | None = None
        self.generations = 0  # generation slots held by Generate streams in progress
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    async def Recommend(self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext
                        ) -> pb.RecommendResponse:
        async with self._track("Recommend", context, request):
            rec, _ = await self._recommend(request, context)
            return self._response(rec, 0, len(rec.items))

    async def RecommendStream(self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext
                              ) -> AsyncIterator[pb.RecommendResponse]:
        async with self._track("RecommendStream", context, request):
            rec, query = await self._recommend(request, context)
            # The first chunk leaves as soon as the batch is computed; the rest follow it.
            for start in range(0, max(len(rec.items), 1), query.chunk_size):
                yield self._response(rec, start, start + query.chunk_size)

    async def AppendEvents(self, request: pb.AppendEventsRequest, context: grpc.aio.ServicerContext
                           ) -> pb.AppendEventsResponse:
        async with self._track("AppendEvents", context, request):
            if not self.append_events:
                raise Rejected(grpc.StatusCode.UNIMPLEMENTED, "AppendEvents is disabled on this server")
            m = self._ready()
            with _rejecting():
                items, stamps = parse_append(request, m.catalogue, m.limits)
            length = m.catalogue.append_events(request.user_id, items, stamps)
            return pb.AppendEventsResponse(history_length=length)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GeneratedItem]:
        async with self._track("Generate", context, request):
            with self._generation_slots(request.beam_width):
                async with contextlib.aclosing(self._generate(request, context)) as items:
                    async for item in items:
                        yield item

    async def SearchItems(self, request: pb.SearchItemsRequest, context: grpc.aio.ServicerContext
                          ) -> pb.SearchItemsResponse:
        async with self._track("SearchItems", context, request):
            catalogue = self._ready().catalogue
            with _rejecting():
                text, limit = parse_search(request)
            # A scan of the whole catalogue: on a thread, so a large one does not hold up the event loop.
            found, total = await asyncio.to_thread(catalogue.search, text, limit)
            items = [pb.CatalogueItem(item_id=catalogue.raw_ids[i], title=catalogue.titles[i]) for i in found]
            return pb.SearchItemsResponse(items=items, total_matches=total)

    async def _generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                        ) -> AsyncIterator[pb.GeneratedItem]:
        m = self._ready()
        catalogue = m.catalogue
        with _rejecting():
            m.batcher.admit(context.time_remaining())
            gen = parse_generate(request, catalogue, m.limits)
        q = gen.query
        if not m.use_prefix_states:
            raise Rejected(grpc.StatusCode.UNIMPLEMENTED, "Generate needs an HSTU model; this one is not")
        state = await self._prefill(request.context.user_id or None, q, context)
        banned, stamp = q.exclude, int(q.timestamps[-1])
        if gen.beam_width > 0:
            beams: tuple[Beam, ...] = (Beam(state),)
            for _ in range(gen.num_items):
                beams = await self._submit(BeamStep(beams, banned, gen.beam_width, stamp), context, follow_up=True)
            for step, (item_id, score) in enumerate(zip(beams[0].items, beams[0].scores, strict=True)):
                item = pb.ScoredItem(item_id=catalogue.raw_ids[item_id], score=score, title=catalogue.titles[item_id])
                yield pb.GeneratedItem(item=item, step=step, model_version=m.version)
            return
        # On the engine's device: the sampler draws its noise there, next to the scores.
        generator = torch.Generator(m.device).manual_seed(gen.seed) if gen.temperature > 0 else None
        for step in range(gen.num_items):
            # One work item per step: other requests and generations share each model step.
            chosen = await self._submit(Decode(state, banned, gen.temperature, stamp, generator), context,
                                        follow_up=True)
            banned, state = np.append(banned, chosen.item), chosen.state
            item = pb.ScoredItem(item_id=catalogue.raw_ids[chosen.item], score=chosen.score,
                                 title=catalogue.titles[chosen.item])
            yield pb.GeneratedItem(item=item, step=step, model_version=m.version)

    # --- shared steps -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _generation_slots(self, beam_width: int) -> Iterator[None]:
        """Holds a Generate's slots of the ``max_generations`` (one, or its beam_width, at most all of
        them: such a beam runs alone), or refuses it at arrival, before any parsing, when they are
        taken: every slot adds a sequence to every model step, and without a bound enough generations
        crowd out every other request."""
        n = min(max(1, beam_width), self.max_generations)
        if self.generations + n > self.max_generations:
            busy = TOO_MANY_GENERATIONS.format(self.generations, self.max_generations)
            raise Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED, busy)
        self.generations += n
        try:
            yield
        finally:
            self.generations -= n

    def _ready(self) -> Loaded:
        if self.loaded is None:
            raise Rejected(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        return self.loaded

    async def _recommend(self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext
                         ) -> tuple[Recommendation, Query]:
        m = self._ready()
        with _rejecting():
            m.batcher.admit(context.time_remaining())  # shed load before spending time on validation
            query = parse_request(request, m.catalogue, m.limits)
        if not m.use_cache:
            return await self._submit(query, context), query
        state = await self._prefill(request.user_id or None, query, context)
        return await self._submit(Score(state, query), context, follow_up=True), query

    async def _prefill(self, key: str | None, query: Query, context: grpc.aio.ServicerContext):
        """The user's prefix state for ``query``'s history: cached keys/values plus the new events, in
        chunks of ``prefill_chunk`` tokens, one model step each (chained inside the batcher)."""
        chunk = self._ready().prefill_chunk
        done = await self._submit(Prefill(key, query.items, query.timestamps, chunk, chain=True), context)
        return done.state

    async def _submit(self, work: Work, context: grpc.aio.ServicerContext, follow_up: bool = False):
        with _rejecting():
            return await self._ready().batcher.submit(work, context.time_remaining(), follow_up=follow_up)

    def _response(self, rec: Recommendation, start: int, end: int) -> pb.RecommendResponse:
        m = self._ready()
        raw, titles = m.catalogue.raw_ids, m.catalogue.titles
        items = [
            pb.ScoredItem(item_id=raw[i], score=s, title=titles[i])
            for i, s in zip(rec.items[start:end].tolist(), rec.scores[start:end].tolist(), strict=True)
        ]
        return pb.RecommendResponse(items=items, model_version=m.version, offset=start,
                                    history_length=rec.history_length)

    @contextlib.asynccontextmanager
    async def _track(self, method: str, context: grpc.aio.ServicerContext, request: object) -> AsyncIterator[None]:
        """Per-RPC bookkeeping: the in-flight count (graceful shutdown waits for it), status and
        latency metrics, ``Rejected`` turned into the RPC's status, and a request whose bytes did not
        decode (``Undecodable``) answered INVALID_ARGUMENT."""
        code = grpc.StatusCode.OK
        start = time.perf_counter()
        self.in_flight += 1
        self.idle.clear()
        try:
            if isinstance(request, Undecodable):
                log.warning("%s: %s from %s", method, request, context.peer())
                raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"request: {request}")
            yield
        except Rejected as e:
            code = e.code
            await _abort(context, e.code, e.message)
        except (asyncio.CancelledError, GeneratorExit):
            # gRPC cancels the handler when the client goes away or its deadline passes.
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            raise
        except Exception:
            log.exception("%s failed", method)
            code = grpc.StatusCode.INTERNAL
            await _abort(context, grpc.StatusCode.INTERNAL, "internal error; see the server log")
        finally:
            self.metrics.requests.labels(method=method, code=code.name).inc()
            self.metrics.request_latency.labels(method=method).observe(time.perf_counter() - start)
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """``context.abort``: sends the status to the client and raises AbortError, which ends the handler.
    If gRPC has ended the RPC already (its deadline passed while the refusal was on its way, as under
    overload), sending fails with ExecuteBatchError (an InternalError), which gRPC would log as a
    traceback; the handler then ends as gRPC's own cancellation ends it (CancelledError)."""
    try:
        await context.abort(code, message)
    except grpc.aio.InternalError:
        raise asyncio.CancelledError from None


@dataclass(frozen=True)
class Undecodable:
    """A request whose bytes are not a message of its method's type."""

    type_name: str
    size: int
    reason: str

    def __str__(self) -> str:
        return f"not a {self.type_name} message ({self.size} bytes: {self.reason.rsplit(': ', 1)[-1]})"


def _decoder(message: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    """The request deserializer of a method. gRPC runs it before the handler and turns an exception
    there into UNKNOWN and a logged traceback, so bytes that do not decode are handed to the handler
    as ``Undecodable`` instead, and answered INVALID_ARGUMENT there."""
    def decode(data: bytes) -> Message | Undecodable:
        try:
            return message.FromString(data)
        except DecodeError as e:
            return Undecodable(message.DESCRIPTOR.full_name, len(data), str(e))

    return decode


def add_servicer(servicer: RecommenderServicer, server: grpc.aio.Server) -> None:
    """Registers ``servicer``'s methods as the generated ``add_RecommenderServiceServicer_to_server``
    does, but with request deserializers that do not raise (``_decoder``)."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["RecommenderService"].methods:
        request, response = (GetMessageClass(t) for t in (method.input_type, method.output_type))
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(getattr(servicer, method.name), request_deserializer=_decoder(request),
                                     response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


@contextlib.contextmanager
def _rejecting():
    """Turns validation and admission errors into the RPC's status."""
    try:
        yield
    except InvalidRequest as e:
        raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
    except QueueFull:
        raise Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED, OVERLOADED) from None
    except DeadlineExpired as e:
        raise Rejected(grpc.StatusCode.DEADLINE_EXCEEDED, str(e)) from None


class RecommenderServer:
    """Owns the gRPC server, the health servicer, the batcher and the model."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.metrics = Metrics()
        self.engine: Engine | None = None
        self.port = 0
        self.metrics_port: int | None = None
        self.closed = asyncio.Event()
        self._servicer = RecommenderServicer(self.metrics, append_events=config.append_events,
                                             max_generations=config.max_generations)
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._shutting_down = False

    async def start(self) -> int:
        """Reads the export, binds, answers health NOT_SERVING while the model is built and warms up,
        then SERVING. Returns the bound port. Raises before binding when the export is missing
        (FileNotFoundError) or malformed, so no port is announced that will not serve."""
        cfg = self.config
        if cfg.prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens must be >= 1, got {cfg.prefill_chunk_tokens}")
        if cfg.max_generations >= cfg.max_concurrent_rpcs:
            # Each Generate stream holds an RPC slot while it runs: with every slot held, Recommend and
            # health checks would be refused until a generation ends.
            raise ValueError(f"--max-generations ({cfg.max_generations}) must be below --max-concurrent-rpcs "
                             f"({cfg.max_concurrent_rpcs}), or Generate streams can hold every RPC slot")
        artifact = await asyncio.to_thread(load_artifact, cfg.artifact)  # reads files: off the event loop
        cfg.index.check(artifact.num_items)  # a knob that cannot work fails here, before the port opens
        torch.set_num_threads(cfg.torch_threads)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        server = grpc.aio.server(options=cfg.grpc_options(), maximum_concurrent_rpcs=cfg.max_concurrent_rpcs)
        add_servicer(self._servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            server,
        )
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert and cfg.tls_key:
            creds = grpc.ssl_server_credentials([(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())])
            self.port = server.add_secure_port(address, creds)
        elif cfg.tls_cert or cfg.tls_key:
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        else:
            self.port = server.add_insecure_port(address)
        await server.start()
        self._server = server
        if cfg.metrics_port is not None:
            self.metrics_port = self.metrics.start_http(cfg.metrics_port, cfg.host)
        log.info("listening on %s:%d (%s), warming up the model of %s", cfg.host, self.port,
                 "TLS" if cfg.tls_cert else "plaintext", cfg.artifact)

        try:
            await self._load(artifact)
        except BaseException:
            await self.shutdown(grace_s=0)  # close the port and the metrics endpoint before failing
            raise
        if not self._shutting_down:
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
            log.info("SERVING model %s (%d items); metrics port %s", self.engine.version if self.engine else "",
                     self.engine.num_items if self.engine else 0, self.metrics_port)
            if cfg.ready_file is not None:
                _write_ready_file(cfg.ready_file, {"host": cfg.host, "port": self.port,
                                                  "metrics_port": self.metrics_port})
        return self.port

    async def _load(self, artifact: Artifact) -> None:
        """Builds and warms the model on a worker thread, so health checks are answered meanwhile."""
        cfg = self.config

        def load() -> tuple[Engine, Catalogue]:
            engine = Engine(artifact, cfg.device, kv_cache_bytes=int(cfg.kv_cache_mb * (1 << 20)),
                            metrics=self.metrics, cuda_graphs=cfg.cuda_graphs, index=cfg.index)
            engine.warm_up(cfg.batcher.max_batch_size)
            appended = AppendedEvents(cfg.appended_events_path(),
                                      AppendLimits(cfg.max_appended_users, cfg.max_appended_events))
            return engine, Catalogue.from_artifact(artifact, appended)

        self.engine, catalogue = await asyncio.to_thread(load)
        batcher: DynamicBatcher[Work, object] = DynamicBatcher(self._compute, cfg.batcher, self.metrics)
        await batcher.start()
        limits = RequestLimits(max_seq_len=self.engine.max_seq_len, max_request_bytes=cfg.max_request_bytes,
                               max_id_chars=cfg.max_id_chars, max_generate_items=cfg.max_generate_items,
                               max_beam_work=cfg.max_beam_work, exclude_seen=cfg.exclude_seen or catalogue.exclude_seen)
        self._servicer.loaded = Loaded(catalogue, batcher, limits, self.engine.version, self.engine.cache is not None,
                                       self.engine.incremental, self.engine.device, cfg.prefill_chunk_tokens)
        # What is loaded now lives as long as the server. Python's full collections would still walk it:
        # with a 10M-item catalogue each walk stalls every thread for ~0.1-0.2 s, the first ones while
        # the first requests arrive. Frozen, the collector never visits it again.
        gc.collect()
        gc.freeze()

    def _compute(self, queries: Sequence[Work]) -> list:
        # Looked up per call, so a test can wrap ``server.engine.compute``.
        assert self.engine is not None
        return self.engine.compute(queries)

    async def shutdown(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, refuse new RPCs, let in-flight ones finish (at most ``grace_s``), stop."""
        if self._shutting_down:
            await self.closed.wait()
            return
        self._shutting_down = True
        grace = self.config.grace_s if grace_s is None else grace_s
        log.info("shutting down: NOT_SERVING, %d RPCs in flight, grace %.1fs", self._servicer.in_flight, grace)
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            # Refuses new RPCs at once. Its own grace timer is only a backstop, set past ours: two stops
            # that overlap can make grpcio (1.85) cancel the calls of a server it has just destroyed
            # (a segfault), when its timer fires as the stop(None) below completes.
            stopping = asyncio.create_task(self._server.stop(grace + STOP_BACKSTOP_S))
            # Recommend RPCs end by themselves; health Watch streams never do, so once the former are
            # done (or the grace is over) the rest are cancelled rather than waited for.
            try:
                if not self._servicer.idle.is_set():
                    await asyncio.wait_for(self._servicer.idle.wait(), grace)
            except TimeoutError:
                log.warning("grace period over with %d RPCs in flight; cancelling them", self._servicer.in_flight)
            await self._server.stop(None)
            await stopping
        if self._servicer.loaded is not None:
            await self._servicer.loaded.batcher.close()
        self.metrics.stop_http()
        # Hands what load() froze back to the collector, so a process that starts servers one after
        # another (tests, notebooks) can free the stopped ones.
        gc.unfreeze()
        log.info("stopped")
        self.closed.set()

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)


def _write_ready_file(path: Path, ports: dict[str, object]) -> None:
    """Writes ``ports`` as JSON to ``path`` through a file beside it and a rename, so a reader polling
    for ``path`` never sees it half-written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(ports))
    os.replace(tmp, path)


# --- command line --------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> ServerConfig:
    """The flags are ``ServerConfig``'s fields (and ``BatcherConfig``'s), generated by ``serving.flags``."""
    return flags.parse(ServerConfig, argv, defaults=ServerConfig(artifact=Path("runs/latest/export")),
                       prog="python -m serving.server", description=__doc__.split("\n\n")[0])


async def serve(config: ServerConfig) -> None:
    """Runs until SIGTERM/SIGINT, then shuts down gracefully."""
    server = RecommenderServer(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: (log.info("got %s", signal.Signals(s).name),
                                                    loop.create_task(server.shutdown())))
    await server.start()
    await server.closed.wait()


def main(argv: Sequence[str] | None = None) -> int:
    # force: an imported library may already have put a handler on the root logger.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    try:
        asyncio.run(serve(parse_args(argv)))
    except (FileNotFoundError, ValueError) as e:  # no export yet, or flags that cannot work: one line, no traceback
        log.error("%s", e)
        return 2
    return 0


def exit_now(code: int) -> None:
    """Ends the process once the server has stopped, without the interpreter's teardown: the static
    destructors of torch and fbgemm (torchrec) alone take 1-3 s on a busy 2-core machine, time that
    would count against the deadline an orchestrator sets after SIGTERM (the grace period + 2 s
    here). Nothing is left to finalise: every RPC has ended and the logs are flushed here."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
