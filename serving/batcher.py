"""Dynamic batching: requests from many RPCs are grouped and computed together on one model thread.

A batch is closed when it holds ``max_batch_size`` requests or when its oldest request has waited
``max_queue_delay_ms``, whichever comes first; while one batch computes, the next one fills up, so under
load batches grow by themselves and at low load a request waits at most the delay. The queue is
bounded: a request that finds it full is refused at once (the server answers RESOURCE_EXHAUSTED)
rather than queued behind work it cannot outlive; so is one whose deadline is nearer than the full
batches already queued ahead of it could be computed (``DeadlineExpired``). A request whose deadline
passes while it waits is answered ``DeadlineExpired`` and never computed; one whose caller went away
is dropped. Under overload this keeps the model busy with requests that can still be delivered
instead of ones whose callers have given up.

``compute`` may answer an item with ``Continue(next_item)`` instead of a result: the next item goes
into the very next batch, ahead of the queue, for the same caller (a long prefill computed a chunk
per model step, beside whatever else is queued, without a trip back through the event loop).

Follow-ups (``Continue``'s next items and later steps of admitted RPCs, such as generation steps) are
not counted against the queue bound, but while new requests wait they get at most half of a batch:
many generations in flight must not starve the requests behind them, nor the reverse.

Example::

    >>> batcher = DynamicBatcher(engine.compute, BatcherConfig(max_batch_size=32, max_queue_delay_ms=2))
    >>> await batcher.start()
    >>> result = await batcher.submit(query, timeout=0.5)   # from many coroutines at once
    >>> await batcher.close()
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from serving.metrics import Metrics
from serving.work import Continue

Q = TypeVar("Q")
R = TypeVar("R")

log = logging.getLogger(__name__)

DEADLINE_MARGIN_S = 0.01
"""A request is answered DEADLINE_EXCEEDED this long before its deadline, so the explicit status
reaches the client before gRPC's own deadline handling cancels the call."""


class QueueFull(Exception):
    """The bounded queue had no room for the request."""


class DeadlineExpired(Exception):
    """The request's deadline passed, or would pass in the queue, before its batch was computed."""


@dataclass(frozen=True)
class BatcherConfig:
    """How requests are grouped.

    Attributes:
        max_batch_size: most requests in one model call (1 disables batching).
        max_queue_delay_ms: longest the oldest request of a batch waits for company.
        max_queue_size: requests that may wait at once; the next one is refused. The default, one batch
            beside the one computing, keeps the model busy; a longer queue only adds waiting, and under
            overload its requests are computed after their callers gave up (4x overload on the CPU
            sandbox: goodput 47% of saturation with 32, 7% with 64, 8% with 256; docs/benchmarks.md).
    """

    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    max_queue_size: int = 32

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue_size < 1 or self.max_queue_delay_ms < 0:
            raise ValueError(f"invalid batcher config {self}")


@dataclass
class _Pending(Generic[Q, R]):
    query: Q
    future: asyncio.Future[R]
    enqueued: float  # loop.time()
    deadline: float | None  # loop.time(), None for no deadline
    continued: bool = False  # a Continue's next item: already admitted, waits for no company


class DynamicBatcher(Generic[Q, R]):
    """Groups ``submit``ted queries into calls of ``compute(list[Q]) -> list[R]`` on one thread.

    ``compute`` runs on a single worker thread, so the model never runs twice at once and the
    event loop stays free to accept and validate requests while a batch computes.
    """

    def __init__(self, compute: Callable[[Sequence[Q]], list[R]], config: BatcherConfig,
                 metrics: Metrics | None = None):
        self.config = config
        self._compute = compute
        self._metrics = metrics
        # New requests; admit() bounds them by max_queue_size.
        self._queue: collections.deque[_Pending[Q, R]] = collections.deque()
        # Continue's next items and follow-ups of admitted RPCs: never refused for room (that would waste
        # the work already done for their RPC), taken first up to their share of a batch (_next).
        self._continued: collections.deque[_Pending[Q, R]] = collections.deque()
        # Set when either deque receives an item, so a loop waiting for the first one wakes up.
        self._arrived = asyncio.Event()
        self._batches = 0  # batches collected so far; its parity alternates the odd slot of a batch
        self._current: list[_Pending[Q, R]] = []  # the batch being collected or computed
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._task: asyncio.Task[None] | None = None
        self._batch_seconds = 0.0
        self._computing_since: float | None = None  # loop.time() the batch on the model thread started

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    def expected_wait(self) -> float:
        """Seconds until a request queued now would be answered, at the recent batch time: what is left
        of the batch computing, the full batches queued ahead of it, and its own. (Leaving out the batch
        computing admitted, under overload, requests that then missed their deadline by about one batch
        time: computed for nothing.) An idle batcher counts as no wait, so a batch time inflated by a
        stall is measured again instead of refusing every request from then on."""
        queued = len(self._queue) + len(self._continued)
        if not queued and self._computing_since is None:
            return 0.0
        left = 0.0
        if self._computing_since is not None:
            left = max(0.0, self._computing_since + self._batch_seconds - asyncio.get_running_loop().time())
        return left + (queued // self.config.max_batch_size + 1) * self._batch_seconds

    def admit(self, timeout: float | None) -> None:
        """Raises ``QueueFull`` or ``DeadlineExpired`` if a request with ``timeout`` seconds left would
        be refused now. Cheap: callers run it before validating, to shed load early."""
        if len(self._queue) >= self.config.max_queue_size:
            raise QueueFull(f"the queue holds {self.config.max_queue_size} requests")
        if timeout is not None and timeout <= max(DEADLINE_MARGIN_S, wait := self.expected_wait()):
            raise DeadlineExpired(f"{timeout:.3f}s left, the queue ahead takes ~{wait:.3f}s")

    async def submit(self, query: Q, timeout: float | None = None, follow_up: bool = False) -> R:
        """Waits for ``query``'s result; raises ``QueueFull`` or ``DeadlineExpired``.

        ``timeout`` is the time left to the caller's deadline in seconds (gRPC's
        ``context.time_remaining()``), None for none. ``follow_up``: a later step of an RPC already
        admitted (a generation's next item): not refused for a full queue, and its batch does not wait
        for company; its deadline still holds.
        """
        loop = asyncio.get_running_loop()
        now = loop.time()
        item = _Pending(query, loop.create_future(), now, None if timeout is None else now + timeout,
                        continued=follow_up)
        if not follow_up:
            self.admit(timeout)
        (self._continued if follow_up else self._queue).append(item)
        self._arrived.set()
        self._observe_depth()
        # If the RPC is cancelled (client gone) this await cancels the future too, and the batcher
        # skips it. The deadline is answered here, a little before gRPC's own timer would cancel the
        # RPC: that cancel reaches a busy client as CANCELLED rather than DEADLINE_EXCEEDED.
        try:
            async with asyncio.timeout(None if timeout is None else timeout - DEADLINE_MARGIN_S):
                return await item.future
        except TimeoutError:
            raise DeadlineExpired(f"deadline reached after {loop.time() - now:.3f}s in the queue") from None

    async def close(self) -> None:
        """Stops batching; requests still queued are cancelled. Call after in-flight RPCs finished."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        # _current: collected or computing when the loop stopped, so never answered otherwise.
        for item in (*self._queue, *self._continued, *self._current):
            item.future.cancel()
        self._queue.clear()
        self._continued.clear()
        # A batch still on the model thread (past the grace period) is left to finish on its own.
        self._executor.shutdown(wait=False, cancel_futures=True)

    # --- the loop ------------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect(loop)
            self._observe_depth()
            # Callers may have left (or run out of time) while the batch filled up.
            now = loop.time()
            batch = [item for item in batch if not self._dead(item, now)]
            self._current = batch = self._drop_doomed(batch, now)
            if batch:
                await self._execute(batch, loop)
            self._current = []

    async def _collect(self, loop: asyncio.AbstractEventLoop) -> list[_Pending[Q, R]]:
        """Blocks for the first live request, then gathers more until the batch is full or the first
        one has waited ``max_queue_delay_ms``. Dead requests met on the way are answered and skipped,
        so under overload the queue drains work that could no longer be delivered without computing it."""
        self._current = batch = []
        follow_ups = 0
        flush_at = 0.0
        while len(batch) < self.config.max_batch_size:
            item = self._next(follow_ups)
            if item is None:
                remaining = flush_at - loop.time() if batch else None
                if remaining is not None and remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    async with asyncio.timeout(remaining):
                        await self._arrived.wait()
                except TimeoutError:
                    break
                continue
            if self._dead(item, loop.time()):
                continue
            if not batch:
                # A continued item has waited already: its batch takes what is queued and goes.
                delay = 0.0 if item.continued else self.config.max_queue_delay_ms / 1000
                flush_at = item.enqueued + delay
            follow_ups += item.continued
            batch.append(item)
        self._batches += 1
        return batch

    def _next(self, follow_ups: int) -> _Pending[Q, R] | None:
        """The next item for the batch being collected, which holds ``follow_ups`` follow-ups so far:
        follow-ups first, but while new requests wait only up to half the batch (the odd slot of an
        odd size alternates between the two from batch to batch, so batch size 1 alternates too)."""
        share = (self.config.max_batch_size + self._batches % 2) // 2
        if self._continued and (not self._queue or follow_ups < share):
            return self._continued.popleft()
        if self._queue:
            return self._queue.popleft()
        return None

    def _drop_doomed(self, batch: list[_Pending[Q, R]], now: float) -> list[_Pending[Q, R]]:
        """Answers the requests whose deadline falls before this batch could finish (at the recent batch
        time): computing them would only delay the others. If none could finish, the batch runs anyway,
        so a batch time inflated by a stall is measured again rather than refusing everything after."""
        finish = now + self._batch_seconds
        doomed = [item for item in batch if item.deadline is not None and item.deadline < finish]
        if not doomed or len(doomed) == len(batch):
            return batch
        for item in doomed:
            item.future.set_exception(DeadlineExpired("deadline falls before the batch could be computed"))
        return [item for item in batch if item.deadline is None or item.deadline >= finish]

    def _dead(self, item: _Pending[Q, R], now: float) -> bool:
        """True for a request not worth computing: its RPC was cancelled, or its deadline has passed
        (answered here)."""
        if item.future.done():
            return True
        if item.deadline is not None and item.deadline <= now:
            item.future.set_exception(DeadlineExpired(f"deadline passed after {now - item.enqueued:.3f}s in the queue"))
            return True
        return False

    async def _execute(self, batch: list[_Pending[Q, R]], loop: asyncio.AbstractEventLoop) -> None:
        queries = [item.query for item in batch]
        start = loop.time()
        if self._metrics is not None:
            self._metrics.batch_size.observe(len(batch))
            for item in batch:
                if not item.continued:
                    self._metrics.queue_latency.observe(start - item.enqueued)
        t0 = time.perf_counter()
        self._computing_since = start
        try:
            results = await loop.run_in_executor(self._executor, self._compute, queries)
        except Exception:
            # One poisoned request must not fail its neighbours: retry them one by one.
            log.exception("batch of %d failed; retrying its requests one at a time", len(batch))
            await self._execute_singly(batch, loop)
            return
        finally:
            self._computing_since = None
        elapsed = time.perf_counter() - t0
        # A moving average of batch time, so deadlines are judged against what a batch costs now.
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * elapsed if self._batch_seconds else elapsed
        if self._metrics is not None:
            self._metrics.compute_latency.observe(elapsed)
        for item, result in zip(batch, results, strict=True):
            self._deliver(item, result, loop)

    def _deliver(self, item: _Pending[Q, R], result, loop: asyncio.AbstractEventLoop) -> None:
        if item.future.done():
            return
        if isinstance(result, Continue):
            self._continued.append(_Pending(result.work, item.future, loop.time(), item.deadline, continued=True))
        else:
            item.future.set_result(result)

    async def _execute_singly(self, batch: list[_Pending[Q, R]], loop: asyncio.AbstractEventLoop) -> None:
        for item in batch:
            if item.future.done():
                continue
            try:
                (result,) = await loop.run_in_executor(self._executor, self._compute, [item.query])
            except Exception as e:
                log.exception("a request failed on its own")
                if not item.future.done():
                    item.future.set_exception(e)
                continue
            self._deliver(item, result, loop)

    def _observe_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.set(len(self._queue) + len(self._continued))
