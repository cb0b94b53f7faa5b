"""DrainingServer: uvicorn.Server whose first SIGTERM/SIGINT drains before it stops.

Readiness and new requests turn 503 at once while in-flight requests finish (up to the drain
timeout); then uvicorn's own shutdown runs (close the socket, lifespan end, engine stop). A signal
during the drain, or before the model is ready, stops at once.

SIGTERM is how orchestrators ask for a normal stop, so it ends in exit code 0: it only sets
should_exit, never records the signal for uvicorn to re-raise (which would exit -15). SIGINT keeps
uvicorn's handling (a second Ctrl-C forces the exit).
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType

import uvicorn

from r1deploy.server.state import Phase, ServerState


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.draining or self.state.phase is not Phase.READY:
            self._stop(sig, frame)
            return
        self.draining = True
        self.state.phase = Phase.DRAINING
        threading.Thread(target=self._drain, args=(sig, frame), name="r1deploy-drain", daemon=True).start()

    def _drain(self, sig: int, frame: FrameType | None) -> None:
        deadline = time.monotonic() + self.state.settings.drain_timeout_s
        while self.state.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop(sig, frame)  # uvicorn's main loop polls the flag this sets

    def _stop(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM:
            self.should_exit = True
        else:
            super().handle_exit(sig, frame)
