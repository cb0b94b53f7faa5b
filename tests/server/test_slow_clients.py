"""Slow and stuck clients against the real `serve` subprocess with --client-timeout 2, over raw sockets:
clients that send nothing, trickle their headers (slowloris) or their body are cut off after the timeout (a
late body with an OpenAI-shaped 408), a client that never reads its stream is cut off once its writes stall
for the timeout (its engine requests aborted, their KV blocks freed), and other clients are served meanwhile."""

from __future__ import annotations

import json
import re
import select
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serve_util import serving

from r1deploy.cli import main

TIMEOUT_S = 2.0
SLACK_S = 4.0  # a loaded CI box: timers fire late, never early


@pytest.fixture(scope="module")
def server(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    # A 4096-token context, so one never-read stream produces more bytes than the loopback socket buffers hold.
    model = tmp_path_factory.mktemp("long") / "tiny"
    shutil.copytree(tiny_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    args = [str(model), "--max-model-len", "4096", "--client-timeout", str(TIMEOUT_S), "--log-level", "warning"]
    with serving(args) as (_, base):
        yield base, int(base.rsplit(":", 1)[1])


def _connect(port: int, receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket()
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(("127.0.0.1", port))
    return sock


def _post_head(body_length: int) -> bytes:
    return (b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % body_length)


def _until_closed(sock: socket.socket, deadline_s: float, trickle: bytes = b"") -> tuple[float, bytes]:
    """(seconds until the server closed the connection, what it sent), sending one byte of `trickle` every
    0.25 s meanwhile (a slowloris client); fails if it stays open past deadline_s."""
    began, received = time.monotonic(), b""
    while time.monotonic() - began < deadline_s:
        if trickle:
            try:
                sock.send(trickle[:1])
            except OSError:  # reset: closed
                return time.monotonic() - began, received
            trickle = trickle[1:]
        if select.select([sock], [], [], 0.25)[0]:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                return time.monotonic() - began, received
            received += data
    raise AssertionError(f"still open after {deadline_s}s; received {received[:200]!r}")


def _served(base: str) -> float:
    began = time.monotonic()
    r = httpx.post(f"{base}/v1/completions", json={"prompt": [1, 7], "max_tokens": 4}, timeout=30)
    assert r.status_code == 200, r.text
    return time.monotonic() - began


def _metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


def test_silent_trickling_and_slow_body_clients_are_cut_off_while_others_are_served(
        server: tuple[str, int]) -> None:
    base, port = server
    body = json.dumps({"prompt": [1, 7], "max_tokens": 4}).encode()
    silent = [_connect(port) for _ in range(10)]
    trickling = [_connect(port) for _ in range(10)]
    for sock in trickling:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\n")
    slow_body = [_connect(port) for _ in range(5)]
    for sock in slow_body:
        sock.sendall(_post_head(len(body)) + body[:5])
    opened = time.monotonic()
    assert _served(base) < TIMEOUT_S + SLACK_S  # not starved by 25 stuck connections

    for sock in silent:
        assert _until_closed(sock, TIMEOUT_S + SLACK_S)[1] == b""
    # one header byte every 0.25 s would keep uvicorn's own keep-alive timer from ever firing
    for sock in trickling:
        assert _until_closed(sock, TIMEOUT_S + SLACK_S, b"Host: test\r\nX-Slow: " + b"a" * 100)[1] == b""
    for sock in slow_body:
        _, response = _until_closed(sock, TIMEOUT_S + SLACK_S)
        head, _, payload = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), response
        error = json.loads(payload)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "request_timeout", error
    assert time.monotonic() - opened >= TIMEOUT_S  # none was cut off early
    for sock in silent + trickling + slow_body:
        sock.close()
    assert _served(base) < TIMEOUT_S + SLACK_S


def test_a_client_that_never_reads_its_stream_is_cut_off_and_its_requests_aborted(server: tuple[str, int]) -> None:
    base, port = server
    aborted_before = _metric(base, "r1deploy_aborted_requests_total")
    # 16 choices x 4000 tokens with 20 logprobs each: tens of MB if it ran to the end, never read
    body = json.dumps({"prompt": [1, 7], "max_tokens": 4000, "ignore_eos": True, "stream": True, "n": 16,
                       "logprobs": 20}).encode()
    stuck = _connect(port, receive_buffer=4096)
    stuck.sendall(_post_head(len(body)) + body)
    began = time.monotonic()
    while _metric(base, "r1deploy_aborted_requests_total") < aborted_before + 16:
        assert time.monotonic() - began < 120, "the never-read stream was not cut off"  # filling the buffers: ~10 s idle
        assert _served(base) < 10  # others are served while it stalls
        time.sleep(0.5)
    assert _metric(base, "r1deploy_kv_cache_blocks_used") == 0
    received = b""
    while chunk := _recv_or_empty(stuck):
        received += chunk
    assert received.startswith(b"HTTP/1.1 200") and b"data: [DONE]" not in received  # cut off, not finished
    stuck.close()


def _recv_or_empty(sock: socket.socket) -> bytes:
    sock.settimeout(5)
    try:
        return sock.recv(1 << 20)
    except ConnectionResetError:
        return b""



def test_client_timeout_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--client-timeout", "0", "--device", "cpu"]) == 2
    assert "--client-timeout must be > 0 seconds, got 0" in capsys.readouterr().err
