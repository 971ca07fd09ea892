"""HTTP connection limits for the uvicorn server: header and body deadlines, per-client connections.

uvicorn's h11 protocol has a keep-alive timer but nothing that bounds how long a client may take
to *send* a request. A client that writes its request head one byte at a time, or a body one byte
at a time, holds a socket, a protocol object and (for the body) an application task for as long
as it likes; a few hundred of them exhaust file descriptors and memory. This module adds three
protections in a subclass of uvicorn's ``H11Protocol``:

Header deadline (``header_timeout``)
    A timer is armed when the connection opens and again when a response finishes on a keep-alive
    connection. It is cancelled only when h11 has parsed a complete request head (request line and
    all headers). Incoming bytes never re-arm or extend it, so trickling a head one byte at a time
    cannot keep the connection alive past the deadline. When it fires, the client gets ``408
    Request Timeout`` if it had sent part of a request head, and the connection is closed (an idle
    keep-alive connection that sent nothing is closed silently, like uvicorn's keep-alive timeout
    does). uvicorn's own keep-alive timer keeps working alongside; whichever fires first wins.

Body deadline (``body_timeout``)
    Armed when a request head with a body is complete; cancelled when the final body chunk has
    arrived or the response has completed. It is one total deadline for the whole body, not an
    idle timeout per chunk, so a steady trickle cannot extend it either. The body is read lazily:
    uvicorn stops reading the socket once 64 KiB of body are buffered and the application has not
    asked for them, and for ``Expect: 100-continue`` the client waits for the application to ask.
    Time spent waiting on the application in those two ways is not charged to the client (reading
    paused by back-pressure is excluded exactly; a 100-continue request's clock starts when the
    ``100 Continue`` has been sent, observed with at most ``min(1 s, body_timeout)`` lag). When the
    deadline passes the request is marked disconnected, so an application waiting in
    ``receive()`` gets ``http.disconnect`` and its handler unwinds, ``408`` is written (best
    effort) and the transport is closed. Once the application has started a response the body
    deadline is ignored: responses, including server-sent-event streams lasting minutes, are never
    timed out by this module.

Connections per client address (``max_connections_per_client``)
    Open connections are counted per peer IP address (the TCP peer, not ``X-Forwarded-For``) in a
    dict shared by every connection of one server: ``make_protocol`` returns a fresh subclass with
    its own counter each time, so two servers in one process do not share counts. A connection
    beyond the limit is answered ``429`` with an OpenAI-style error envelope and closed; it is not
    counted. An admitted connection releases its slot exactly once, in ``connection_lost`` (or when
    it is handed to a WebSocket protocol). The limit is off (0) by default because behind a reverse
    proxy or load balancer every client has the proxy's address, and a per-IP limit would then cap
    the whole service; enable it only when clients connect directly.

Rejected (429) connections write their response, half-close the socket and drain what the client
had already sent for up to one second before closing, so the client reads the 429 rather than a
TCP reset caused by unread request bytes.

Use ``uvicorn_config(app, host=..., port=...)`` to get the ``uvicorn.Config`` the server runs
with, or ``make_protocol(...)`` to get just the protocol class for ``uvicorn.Config(http=...)``.
These protections need the h11 protocol; they do not apply to ``http="httptools"``.
A timeout of 0 (or less) disables that deadline.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, ClassVar

import h11
import uvicorn
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["LimitedH11Protocol", "make_protocol", "uvicorn_config"]

# How long a rejected (429) connection may linger, draining the client's request, before closing.
_REJECT_LINGER_S = 1.0
# How long a connection we closed may take to flush before it is aborted.
_CLOSE_GRACE_S = 5.0


def _error_response(status: int, reason: str, err_type: str, message: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": err_type, "param": None,
                                 "code": status}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\n"
            "content-type: application/json\r\n"
            f"content-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode("ascii")
    return head + body


_TOO_MANY = _error_response(429, "Too Many Requests", "rate_limit_error",
                            "Too many concurrent connections from this client address.")
_HEAD_TIMEOUT = _error_response(408, "Request Timeout", "invalid_request_error",
                                "Request headers were not received in time.")
_BODY_TIMEOUT = _error_response(408, "Request Timeout", "invalid_request_error",
                                "Request body was not received in time.")


class _ClockedFlowControl(FlowControl):
    """uvicorn's read/write flow control, also totalling the time reading was paused (in loop
    time) and calling ``on_resume`` when reading resumes, so the body deadline can leave out the
    time the application was not consuming the body."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop,
                 on_resume: Any) -> None:
        super().__init__(transport)
        self._loop = loop
        self._on_resume = on_resume
        self.paused_at: float | None = None
        self.paused_total = 0.0

    def pause_reading(self) -> None:
        if not self.read_paused:
            self.paused_at = self._loop.time()
        super().pause_reading()

    def resume_reading(self) -> None:
        was_paused = self.read_paused
        super().resume_reading()
        if was_paused:
            if self.paused_at is not None:
                self.paused_total += self._loop.time() - self.paused_at
            self.paused_at = None
            self._on_resume()

    def paused_so_far(self) -> float:
        """Total paused time, including a pause still in progress."""
        if self.read_paused and self.paused_at is not None:
            return self.paused_total + (self._loop.time() - self.paused_at)
        return self.paused_total


class LimitedH11Protocol(H11Protocol):
    """``H11Protocol`` with a header deadline, a body deadline and a per-client-IP connection
    limit (see the module docstring). Settings are class attributes; use ``make_protocol`` to get a
    subclass bound to particular settings with its own per-IP counter."""

    header_timeout: ClassVar[float] = 10.0
    body_timeout: ClassVar[float] = 30.0
    max_connections_per_client: ClassVar[int] = 0
    # Open, admitted connections per client IP; shared by all instances of one (sub)class.
    client_connections: ClassVar[dict[str, int]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._counted_ip: str | None = None
        self._rejected = False
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._timed_cycle: Any = None        # the request/response cycle the body clock belongs to
        self._body_active = False            # body deadline in force for self._timed_cycle
        self._body_started: float | None = None   # loop time the body clock started (None: 100-continue pending)
        self._body_paused_base = 0.0         # flow.paused_so_far() when the clock started

    # --- connection lifecycle -------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = _ClockedFlowControl(transport, self.loop, self._on_read_resumed)
        ip = self.client[0] if self.client else None
        limit = self.max_connections_per_client
        if ip is not None and limit > 0:
            counts = type(self).client_connections
            if counts.get(ip, 0) >= limit:
                self._reject(ip)
                return
            counts[ip] = counts.get(ip, 0) + 1
            self._counted_ip = ip
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._release_slot()
        self._cancel_timers()
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return  # draining a rejected connection; its request is never parsed
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        self._sync_request_state()

    def on_response_complete(self) -> None:
        self._cancel_body_timer()
        if not self.transport.is_closing():
            self._arm_header_timer()
        super().on_response_complete()

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        # The transport moves to another protocol whose connection_lost we never see: stop our
        # timers and give the slot back now so the count cannot leak.
        self._cancel_timers()
        self._release_slot()
        super().handle_websocket_upgrade(event)

    def shutdown(self) -> None:
        if self._rejected:
            self.transport.close()
            return
        super().shutdown()

    # --- per-client limit -----------------------------------------------------------------

    def _reject(self, ip: str) -> None:
        self._rejected = True
        self.logger.info("Rejected connection from %s: over %d concurrent connections per client",
                         ip, self.max_connections_per_client)
        transport = self.transport
        transport.write(_TOO_MANY)
        try:
            can_half_close = transport.can_write_eof()
        except Exception:  # noqa: BLE001 - transports without half-close support
            can_half_close = False
        if can_half_close:
            # Half-close and drain the request the client may already have sent: closing with
            # unread bytes would reset the connection and could discard the 429 before it is read.
            # eof_received (inherited, returns None) closes the transport when the client is done.
            transport.write_eof()
            self._close_timer = self.loop.call_later(_REJECT_LINGER_S, self._close_now)
        else:
            transport.close()

    def _release_slot(self) -> None:
        ip, self._counted_ip = self._counted_ip, None
        if ip is None:
            return
        counts = type(self).client_connections
        left = counts.get(ip, 0) - 1
        if left > 0:
            counts[ip] = left
        else:
            counts.pop(ip, None)

    # --- header deadline ------------------------------------------------------------------

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if self.header_timeout > 0:
            self._header_timer = self.loop.call_later(self.header_timeout, self._on_header_timeout)

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        # Answer 408 only if the client is part-way through a request head; an idle keep-alive
        # connection (nothing received since the last response) is closed silently.
        partial = (self.conn.our_state is h11.IDLE and self.conn.their_state is h11.IDLE
                   and bool(self.conn.trailing_data[0]))
        self.logger.info("%sRequest head not received within %.3gs; closing connection",
                         self._prefix(), self.header_timeout)
        if partial:
            self.transport.write(_HEAD_TIMEOUT)
        self._close()

    # --- body deadline --------------------------------------------------------------------

    def _sync_request_state(self) -> None:
        """After h11 events were processed: notice a newly parsed request head (cancel the header
        deadline, start the body deadline if a body follows) and a completed body."""
        cycle = self.cycle
        if cycle is None:
            return
        if cycle is not self._timed_cycle:
            self._timed_cycle = cycle
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            self._cancel_body_timer()
            if cycle.more_body and self.body_timeout > 0 and not self.transport.is_closing():
                self._body_active = True
                self._body_paused_base = self._paused_so_far()
                if cycle.waiting_for_100_continue:
                    # The client sends nothing until the app asks for the body (100 Continue).
                    self._body_started = None
                    self._body_timer = self.loop.call_later(self._poll_interval(),
                                                            self._on_body_timer)
                else:
                    self._body_started = self.loop.time()
                    self._body_timer = self.loop.call_later(self.body_timeout, self._on_body_timer)
        elif self._body_active and not cycle.more_body:
            self._cancel_body_timer()

    def _poll_interval(self) -> float:
        return min(1.0, self.body_timeout)

    def _paused_so_far(self) -> float:
        flow = self.flow
        return flow.paused_so_far() if isinstance(flow, _ClockedFlowControl) else 0.0

    def _body_remaining(self) -> float:
        assert self._body_started is not None
        charged = (self.loop.time() - self._body_started
                   - (self._paused_so_far() - self._body_paused_base))
        return self.body_timeout - charged

    def _body_deadline_applies(self) -> bool:
        cycle = self.cycle
        return (self._body_active and cycle is not None and cycle is self._timed_cycle
                and cycle.more_body and not cycle.response_started and not cycle.disconnected
                and not self.transport.is_closing())

    def _on_body_timer(self) -> None:
        self._body_timer = None
        if not self._body_deadline_applies():
            self._body_active = False
            return
        cycle = self.cycle
        if self._body_started is None:
            if cycle.waiting_for_100_continue:
                self._body_timer = self.loop.call_later(self._poll_interval(), self._on_body_timer)
                return
            # 100 Continue went out since the last look: start the clock now.
            self._body_started = self.loop.time()
            self._body_paused_base = self._paused_so_far()
        if self.flow.read_paused:
            return  # the app is not consuming the body; _on_read_resumed re-arms
        remaining = self._body_remaining()
        if remaining > 0:
            self._body_timer = self.loop.call_later(remaining, self._on_body_timer)
            return
        self.logger.info("%sRequest body not received within %.3gs; closing connection",
                         self._prefix(), self.body_timeout)
        self._body_active = False
        # Mark the request disconnected first: the app's pending or next receive() returns
        # http.disconnect, and anything it still sends is dropped by uvicorn.
        cycle.disconnected = True
        self.transport.write(_BODY_TIMEOUT)
        self._close()
        cycle.message_event.set()

    def _on_read_resumed(self) -> None:
        if self._body_timer is None and self._body_started is not None \
                and self._body_deadline_applies():
            self._body_timer = self.loop.call_later(max(0.0, self._body_remaining()),
                                                    self._on_body_timer)

    # --- helpers --------------------------------------------------------------------------

    def _cancel_body_timer(self) -> None:
        self._body_active = False
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _cancel_timers(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._cancel_body_timer()

    def _close(self) -> None:
        self._cancel_timers()
        self.transport.close()
        # close() waits for buffered output to flush; a peer that never reads must not keep the
        # socket open that way.
        if self._close_timer is None:
            self._close_timer = self.loop.call_later(_CLOSE_GRACE_S, self._abort_now)

    def _close_now(self) -> None:
        self._close_timer = None
        self.transport.close()
        self._close_timer = self.loop.call_later(_CLOSE_GRACE_S, self._abort_now)

    def _abort_now(self) -> None:
        self._close_timer = None
        self.transport.abort()

    def _prefix(self) -> str:
        return "%s:%d - " % self.client if self.client else ""


def make_protocol(header_timeout: float, body_timeout: float,
                  max_connections_per_client: int) -> type[LimitedH11Protocol]:
    """A ``LimitedH11Protocol`` subclass bound to these settings, with its own per-IP counter.
    Pass it as ``uvicorn.Config(http=...)``; call once per server."""
    if max_connections_per_client < 0:
        raise ValueError("max_connections_per_client must be >= 0 (0 = unlimited)")
    return type("BoundLimitedH11Protocol", (LimitedH11Protocol,), {
        "header_timeout": float(header_timeout),
        "body_timeout": float(body_timeout),
        "max_connections_per_client": int(max_connections_per_client),
        "client_connections": {},
        "__module__": __name__,
    })


def uvicorn_config(app: Any, *, host: str, port: int, log_level: str = "warning",
                   header_timeout: float = 10.0, body_timeout: float = 30.0,
                   max_connections_per_client: int = 0, timeout_keep_alive: int = 5,
                   shutdown_timeout: float = 30.0, **extra: Any) -> uvicorn.Config:
    """The ``uvicorn.Config`` the server runs with: the limited h11 protocol, a 64 KiB cap on an
    incomplete request head, the keep-alive timeout, and a graceful-shutdown timeout a little longer
    than the engine's drain (``shutdown_timeout``). ``extra`` goes to ``uvicorn.Config`` as is and
    may override these, except ``http``, which is always the limited protocol."""
    if "http" in extra:
        raise TypeError("uvicorn_config() sets http itself; use make_protocol() with uvicorn.Config "
                        "for a different protocol")
    kwargs: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_level": log_level,
        "http": make_protocol(header_timeout, body_timeout, max_connections_per_client),
        "h11_max_incomplete_event_size": 64 * 1024,
        "timeout_keep_alive": timeout_keep_alive,
        "timeout_graceful_shutdown": max(1, int(shutdown_timeout) + 5),
    }
    kwargs.update(extra)
    return uvicorn.Config(app, **kwargs)
