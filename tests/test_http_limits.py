"""Connection limits of jaxserve.server.http against a real uvicorn server on loopback: slow request
heads and trickled bodies are cut at their deadlines, legitimate uploads, keep-alive and long
streaming responses are untouched, and the per-client connection limit admits, rejects and
releases correctly."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from jaxserve.server.http import LimitedH11Protocol, make_protocol, uvicorn_config

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.5
STREAM_CHUNKS = 15          # one every 0.2 s: 3 s, longer than both timeouts
LIMIT = 3


# --- a tiny app -----------------------------------------------------------------------------

def build_app(events: list) -> Starlette:
    async def echo(request: Request):
        try:
            body = await request.body()
        except ClientDisconnect:
            events.append(("disconnect", request.url.path))
            return JSONResponse({}, status_code=400)   # dropped: the connection is gone
        events.append(("echo", len(body)))
        return JSONResponse({"length": len(body), "client_port": request.client.port})

    async def slow_echo(request: Request):
        # Starts reading the body only after longer than the body deadline: time the client
        # spends blocked on the app (back-pressure, 100-continue) is not charged to it.
        await asyncio.sleep(float(request.query_params["delay"]))
        body = await request.body()
        return JSONResponse({"length": len(body)})

    async def stream(request: Request):
        async def chunks():
            for i in range(STREAM_CHUNKS):
                yield f"data: {i}\n\n".encode()
                await asyncio.sleep(0.2)
        return StreamingResponse(chunks(), media_type="text/event-stream")

    async def ping(request: Request):
        return JSONResponse({"ok": True, "client_port": request.client.port})

    return Starlette(routes=[Route("/echo", echo, methods=["POST"]),
                             Route("/slow-echo", slow_echo, methods=["POST"]),
                             Route("/stream", stream), Route("/ping", ping)])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, **limits):
        self.events: list = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = uvicorn_config(build_app(self.events), host="127.0.0.1", port=self.port,
                                     shutdown_timeout=1, **limits)
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def counts(self) -> dict[str, int]:
        return self.config.http_protocol_class.client_connections

    def __enter__(self) -> "Server":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def server():
    with Server(header_timeout=HEADER_TIMEOUT, body_timeout=BODY_TIMEOUT) as s:
        yield s


@pytest.fixture(scope="module")
def limited():
    with Server(header_timeout=10, body_timeout=10, max_connections_per_client=LIMIT) as s:
        yield s


# --- raw-socket helpers ---------------------------------------------------------------------

def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def closed_by_server(s: socket.socket, received: bytearray) -> bool:
    """Non-blocking: has the server closed (or reset) this connection? Collects what it sent."""
    while select.select([s], [], [], 0)[0]:
        try:
            data = s.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return True
        if not data:
            return True
        received += data
    return False


def trickle_until_closed(s: socket.socket, data: bytes, interval: float, limit: float):
    """Send `data` one byte per `interval` until the server closes the connection; return the
    seconds it took and whatever the server sent."""
    received = bytearray()
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < limit:
        if closed_by_server(s, received):
            return time.monotonic() - t0, bytes(received)
        try:
            s.sendall(data[i % len(data):i % len(data) + 1])
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - t0, bytes(received)
        i += 1
        time.sleep(interval)
    raise AssertionError(f"connection still open after {limit}s")


def read_response(s: socket.socket) -> tuple[int, dict, bytes]:
    """Read one Content-Length-framed response."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, f"connection closed mid-head: {buf!r}"
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return status, headers, body


def get(s: socket.socket, path: str = "/ping") -> tuple[int, dict, bytes]:
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    return read_response(s)


def wait_until(cond, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


# --- deadlines --------------------------------------------------------------------------------

def test_slow_headers_are_cut_at_header_timeout(server):
    with connect(server.port) as s:
        head = b"GET /ping HTTP/1.1\r\nHost: test\r\nX-Slow: " + b"a" * 1000
        elapsed, received = trickle_until_closed(s, head, 0.2, limit=HEADER_TIMEOUT + 3)
    assert HEADER_TIMEOUT - 0.1 <= elapsed <= HEADER_TIMEOUT + 1.0, elapsed
    if received:  # best effort: a 408 precedes the close
        assert received.startswith(b"HTTP/1.1 408 "), received


def test_trickled_body_is_cut_at_body_timeout(server):
    n_events = len(server.events)
    with connect(server.port) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Type: application/octet-stream\r\n"
                  b"Content-Length: 10000\r\n\r\n")
        # A byte every 0.1 s keeps arriving, yet the total deadline still fires.
        elapsed, received = trickle_until_closed(s, b"x", 0.1, limit=BODY_TIMEOUT + 3)
    assert BODY_TIMEOUT - 0.1 <= elapsed <= BODY_TIMEOUT + 1.0, elapsed
    if received:
        assert received.startswith(b"HTTP/1.1 408 "), received
    # The handler waiting in receive() saw a disconnect and never got a partial body.
    wait_until(lambda: len(server.events) > n_events)
    assert server.events[n_events:] == [("disconnect", "/echo")]
    # And the server goes on serving.
    r = httpx.post(server.url + "/echo", content=b"y" * 100, timeout=5)
    assert r.status_code == 200 and r.json()["length"] == 100


def test_legitimate_traffic_is_untouched(server):
    stream_result: dict = {}

    def read_stream():
        t0 = time.monotonic()
        with httpx.stream("GET", server.url + "/stream", timeout=10) as r:
            stream_result["status"] = r.status_code
            stream_result["body"] = b"".join(r.iter_bytes())
        stream_result["elapsed"] = time.monotonic() - t0

    def delayed_upload():
        r = httpx.post(server.url + f"/slow-echo?delay={BODY_TIMEOUT + 0.5}",
                       content=b"u" * 1_000_000, timeout=10)
        stream_result["delayed_upload"] = (r.status_code, r.json()["length"])

    def delayed_continue():
        with connect(server.port) as s:
            s.sendall(f"POST /slow-echo?delay={BODY_TIMEOUT + 0.5} HTTP/1.1\r\nHost: test\r\n"
                      "Expect: 100-continue\r\nContent-Length: 5\r\n\r\n".encode())
            s.settimeout(10)
            interim = b""
            while b"\r\n\r\n" not in interim:
                interim += s.recv(1)
            assert interim.startswith(b"HTTP/1.1 100 "), interim
            s.sendall(b"hello")
            status, _, body = read_response(s)
            stream_result["delayed_continue"] = (status, json.loads(body)["length"])

    workers = [threading.Thread(target=f) for f in (read_stream, delayed_upload, delayed_continue)]
    for w in workers:
        w.start()

    # A 1 MB upload.
    r = httpx.post(server.url + "/echo", content=b"z" * 1_000_000, timeout=10)
    assert r.status_code == 200 and r.json()["length"] == 1_000_000

    # Keep-alive: two sequential requests reuse one connection ...
    with httpx.Client(base_url=server.url, timeout=5) as client:
        first = client.get("/ping").json()["client_port"]
        second = client.post("/echo", content=b"abc").json()
        assert second["length"] == 3
        assert second["client_port"] == first
        # ... and once idle past the header deadline the server closes it: the next request
        # has to come from a new connection.
        time.sleep(HEADER_TIMEOUT + 0.5)
        assert client.get("/ping").json()["client_port"] != first

    # The idle close, timed on a raw socket.
    with connect(server.port) as s:
        assert get(s)[0] == 200
        t0 = time.monotonic()
        s.settimeout(HEADER_TIMEOUT + 3)
        assert s.recv(1) == b""          # closed silently: no 408 for an idle connection
        assert time.monotonic() - t0 <= HEADER_TIMEOUT + 0.5

    for w in workers:
        w.join(timeout=10)
    # Bodies the app was slow to ask for are not cut.
    assert stream_result["delayed_upload"] == (200, 1_000_000)
    assert stream_result["delayed_continue"] == (200, 5)
    # A response streaming longer than both deadlines completes.
    assert stream_result["status"] == 200
    assert stream_result["body"] == b"".join(f"data: {i}\n\n".encode() for i in range(STREAM_CHUNKS))
    assert stream_result["elapsed"] > HEADER_TIMEOUT + BODY_TIMEOUT


def test_slow_header_flood_does_not_block_normal_requests(server):
    socks = []
    try:
        for _ in range(100):
            s = connect(server.port)
            s.sendall(b"GET /ping HTTP/1.1\r\nHost: te")
            socks.append(s)
        t0 = time.monotonic()
        r = httpx.get(server.url + "/ping", timeout=5)
        assert r.status_code == 200
        assert time.monotonic() - t0 < 0.5
        # All of them are closed by the header deadline.
        received = bytearray()
        deadline = time.monotonic() + HEADER_TIMEOUT + 2
        pending = list(socks)
        while pending:
            assert time.monotonic() < deadline, f"{len(pending)} slow connections still open"
            pending = [s for s in pending if not closed_by_server(s, received)]
            time.sleep(0.05)
    finally:
        for s in socks:
            s.close()


# --- per-client connection limit -----------------------------------------------------------

def assert_rejected(port: int) -> None:
    with connect(port) as s:
        try:
            s.sendall(b"GET /ping HTTP/1.1\r\nHost: test\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, headers, body = read_response(s)
        assert status == 429
        assert headers["content-type"] == "application/json"
        assert headers["connection"] == "close"
        err = json.loads(body)["error"]
        assert err["type"] == "rate_limit_error" and err["code"] == 429 and err["param"] is None
        assert err["message"]
        s.settimeout(3)
        assert s.recv(1) == b""


def test_per_client_limit(limited):
    socks = [connect(limited.port) for _ in range(LIMIT)]
    try:
        wait_until(lambda: limited.counts.get("127.0.0.1") == LIMIT)
        assert_rejected(limited.port)
        assert limited.counts.get("127.0.0.1") == LIMIT      # the rejected one was not counted
        for s in socks:                                       # the admitted ones work
            assert get(s)[0] == 200
        socks.pop().close()
        wait_until(lambda: limited.counts.get("127.0.0.1") == LIMIT - 1)
        with connect(limited.port) as s:
            assert get(s)[0] == 200
    finally:
        for s in socks:
            s.close()
    wait_until(lambda: "127.0.0.1" not in limited.counts)


def test_per_client_counts_do_not_leak(limited):
    # 50 connections: idle, finished requests, rejected ones, closed by client in all orders.
    opened = 0
    while opened < 50:
        batch = [connect(limited.port) for _ in range(LIMIT + 2)]
        opened += len(batch)
        if opened % 2:
            for s in batch:
                try:
                    s.sendall(b"GET /ping HTTP/1.1\r\nHost: test\r\n\r\n")
                except OSError:
                    pass
            for s in batch:
                try:
                    s.settimeout(3)
                    s.recv(65536)
                except OSError:
                    pass
        for s in reversed(batch):
            s.close()
    wait_until(lambda: "127.0.0.1" not in limited.counts)

    with httpx.Client(base_url=limited.url, timeout=5) as c1, \
            httpx.Client(base_url=limited.url, timeout=5) as c2, \
            httpx.Client(base_url=limited.url, timeout=5) as c3:
        ports = {c.get("/ping").json()["client_port"] for c in (c1, c2, c3)}
        assert len(ports) == LIMIT
        assert limited.counts.get("127.0.0.1") == LIMIT
        assert_rejected(limited.port)
        # httpx sees the 429 envelope as a normal response.
        with httpx.Client(base_url=limited.url, timeout=5) as c4:
            r = c4.get("/ping")
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    wait_until(lambda: "127.0.0.1" not in limited.counts)


# --- configuration --------------------------------------------------------------------------

def test_make_protocol_binds_settings_and_separate_counters():
    a = make_protocol(1, 2, 3)
    b = make_protocol(4, 5, 0)
    assert issubclass(a, LimitedH11Protocol)
    assert (a.header_timeout, a.body_timeout, a.max_connections_per_client) == (1.0, 2.0, 3)
    assert (b.header_timeout, b.body_timeout, b.max_connections_per_client) == (4.0, 5.0, 0)
    assert a.client_connections is not b.client_connections
    assert a.client_connections is not LimitedH11Protocol.client_connections
    with pytest.raises(ValueError):
        make_protocol(1, 1, -1)


def test_uvicorn_config_settings():
    app = build_app([])
    cfg = uvicorn_config(app, host="127.0.0.1", port=1234, header_timeout=7, body_timeout=8,
                         max_connections_per_client=9, timeout_keep_alive=3, shutdown_timeout=12)
    assert cfg.h11_max_incomplete_event_size == 64 * 1024
    assert cfg.timeout_keep_alive == 3
    assert cfg.timeout_graceful_shutdown == 17
    assert cfg.log_level == "warning"
    proto = cfg.http
    assert issubclass(proto, LimitedH11Protocol)
    assert (proto.header_timeout, proto.body_timeout, proto.max_connections_per_client) == (7, 8, 9)
    assert uvicorn_config(app, host="h", port=1, shutdown_timeout=0.2).timeout_graceful_shutdown == 5
    assert uvicorn_config(app, host="h", port=1, backlog=17).backlog == 17
    with pytest.raises(TypeError):
        uvicorn_config(app, host="h", port=1, http="h11")
