"""AsyncLLMEngine: one engine loop on its own thread, feeding per-request asyncio streams.

The model step blocks, so it runs on a thread; requests and aborts cross into it through a
thread-safe inbox, and outputs cross back with loop.call_soon_threadsafe. A consumer that stops
iterating (a client disconnect) aborts its request, which frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from r1deploy.engine.engine import LLMEngine
from r1deploy.engine.outputs import RequestOutput
from r1deploy.engine.request import Request
from r1deploy.sampling_params import SamplingParams

HEALTH_POLL_S = 1.0  # how often an idle loop checks its ranks


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass(frozen=True)
class _Failed:
    error: BaseException


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: queue.Queue[Request | _Abort | None] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # set if the loop died; health checks read it

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="r1deploy-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        if self._thread is not None:
            self._inbox.put(None)
            self._thread.join()
            self._thread = None
        self.engine.shutdown()  # tensor-parallel workers, if any

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def generate(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream RequestOutputs for one request; the last one has finished=True. Validation errors
        (ValueError) are raised here, before the request is queued."""
        self.start()
        request = self.engine.make_request(prompt, params, request_id)
        stream: asyncio.Queue[RequestOutput | _Failed] = asyncio.Queue()
        self._streams[request.request_id] = (asyncio.get_running_loop(), stream)
        self._inbox.put(request)
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, _Failed):
                    raise RuntimeError(f"engine failed: {item.error}") from item.error
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request.request_id, None)
            if not finished:
                self._inbox.put(_Abort(request.request_id))

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    def _drain_inbox(self, block: bool) -> bool:
        """Apply queued adds and aborts; False once shutdown was asked. While idle (block), check the
        executor's ranks every HEALTH_POLL_S: a tensor-parallel worker that died between requests fails the
        loop now, so health turns 503 and the server exits for a restart without waiting for a request."""
        while True:
            try:
                item = self._inbox.get(block=block, timeout=HEALTH_POLL_S if block else None)
            except queue.Empty:
                if not block:
                    return True
                self.engine.executor.check_health()
                continue
            block = False
            if item is None:
                return False
            if isinstance(item, _Abort):
                self.engine.abort(item.request_id)
            else:
                try:
                    self.engine.enqueue(item)
                except ValueError as exc:  # e.g. a request id already in use: fail that request only
                    self._publish(item.request_id, _Failed(exc))

    def _loop(self) -> None:
        try:
            while self._drain_inbox(block=not self.engine.has_unfinished_requests()):
                outputs = self.engine.step()
                for output in outputs:
                    error = output.outputs[0].error
                    self._publish(output.request_id, _Failed(RuntimeError(error)) if error else output)
                if not outputs and not self.engine.scheduler.running:
                    time.sleep(0.001)  # the scheduler is holding arrivals to batch them: don't spin
        except BaseException as exc:  # noqa: BLE001 - every waiting client must hear of it
            self.error = exc
            for request_id in list(self._streams):
                self._publish(request_id, _Failed(exc))

    def _publish(self, request_id: str, item: RequestOutput | _Failed) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, item)
