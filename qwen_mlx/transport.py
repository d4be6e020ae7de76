"""`qwen-mlx serve` under hostile clients: the HTTP connection layer below the app, so nobody can freeze it.

uvicorn holds a connection that never finishes its request forever, accepts until the process runs out of
file descriptors, answers a malformed request in plain text, and logs every one of them. This module is
what `serve` puts around it: an h11 protocol with a read timeout and a connection limit (`http_protocol`),
an ASGI front that checks the `Host` header and the body's framing (`Gate`), and a log filter that says a
repeated warning once per few seconds (`quiet_logs`).

Design decisions:
- A subclass of uvicorn's `H11Protocol`, passed as `http=`, rather than a proxy or a server of our own: it
  changes three moments (a connection opens, bytes arrive, it closes) and leaves parsing, flow control
  and keep-alive to uvicorn. h11 rather than httptools (which `auto` picks where installed): one parser
  to harden, and the server's speed is the model's, not the parser's. The event loop is uvloop where
  installed (a dependency off Windows; uvicorn's `auto` picks it): in Python's own loop each accepted
  connection costs a task and several loop turns, so a burst of 3,000 opened at once kept `/health` waiting
  three times as long (0.2 s against 0.06 s on two cores, the protocol below unchanged).
- One read timeout for a whole request, head and body, counted from the connection's first byte (or its
  opening): a client that trickles a byte a second cannot outlast it, unlike a timeout between reads. It
  is disarmed once the request is read, so a slow reader of a streamed answer is never cut off; the body
  read in `server.Guard` ends with it (the closed connection is an `http.disconnect`).
- The connection limit sits below the descriptor limit (raised to the hard limit first where allowed:
  macOS starts at 256), with room left for the model's files and the log. A connection beyond it closes
  the oldest one that is not being answered (idle keep-alive first, then one still sending its request),
  so `/health` and new clients get in however many idle sockets someone holds; only when every slot is
  an answer in progress is the newcomer refused with a 503.
- Errors written below the app (a malformed request, a timed-out head, a refusal) are OpenAI's JSON shape,
  as every route's are (`wire.error_body`); the request's path, which picks the shape, is not known yet.
- `Host` must name a loopback address, `localhost`, the address the connection arrived on or a name in
  `--allowed-hosts` (DNS rebinding: a web page whose name resolves to 127.0.0.1 would otherwise reach a
  server that trusts loopback). Bound to a non-loopback address, which needs an API key, any Host is
  accepted unless `--allowed-hosts` is given: the key is the protection there (a rebinding page cannot
  send it), and the names a LAN knows the machine by (mDNS, DHCP) are not knowable here. A wrong Host is a
  400, as Django's and Starlette's host checks answer it: the request is malformed for this server.
- A request with both Content-Length and Transfer-Encoding is refused (h11 accepts it, letting chunked
  win), and the connection closed: a proxy in front that reads the other header would see another request.
"""

from __future__ import annotations

import asyncio
import http
import ipaddress
import json
import logging
import os
import threading
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import QwenMLXError
from .wire import error_body, error_response

READ_TIMEOUT_S = 60.0  # a whole request, head and body: 16 MiB at 280 KB/s
DEFAULT_MAX_CONNECTIONS = 4096
FD_WANTED = 8192  # the soft descriptor limit asked for at start (macOS allows up to 10240 without root)
FD_HEADROOM = 128  # descriptors kept free beyond those open at start: shards read lazily, the log, the tokenizer
LOG_INTERVAL_S = 5.0
LOGGERS = ("uvicorn.error", "asyncio")  # not uvicorn.access: its lines are one per request by design
LOOPBACK_NAMES = ("localhost",)


def raise_fd_limit() -> int:
    """The soft file-descriptor limit, first raised towards `FD_WANTED` (within the hard limit) if lower."""
    try:
        import resource
    except ImportError:  # Windows: no such limit to raise
        return FD_WANTED
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = FD_WANTED if hard == resource.RLIM_INFINITY else min(FD_WANTED, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):  # a sandbox may refuse; the limit below follows what is left
            pass
    return FD_WANTED if soft == resource.RLIM_INFINITY else soft


def _open_descriptors() -> int:
    try:
        return len(os.listdir("/dev/fd"))  # Linux and macOS alike
    except OSError:
        return 16


def connection_limit(requested: int | None) -> int:
    """How many connections the server holds at once: `requested` (`--max-connections`) if the descriptor
    limit leaves room for it, else a `QwenMLXError` that says what to change; by default as many as fit,
    up to `DEFAULT_MAX_CONNECTIONS`."""
    soft = raise_fd_limit()
    room = soft - _open_descriptors() - FD_HEADROOM
    if room < 1 or (requested is not None and requested > room):
        wanted = f"--max-connections {requested}" if requested is not None else "the server"
        raise QwenMLXError(
            f"{wanted} needs more file descriptors than the limit leaves ({max(room, 0)} free under ulimit -n "
            f"{soft}): raise it (ulimit -n {FD_WANTED}) or lower --max-connections"
        )
    return requested if requested is not None else min(DEFAULT_MAX_CONNECTIONS, room)


def raw_error(status: int, message: str, code: str, type: str = "invalid_request_error", retry_after=None) -> bytes:
    """A whole HTTP/1.1 error response, for the moments before a request exists (no h11 cycle to send it)."""
    body = json.dumps(error_body(message, type, code=code, status=status), separators=(",", ":")).encode()
    head = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if retry_after is not None:
        head.append(f"retry-after: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class Connection(H11Protocol):
    """uvicorn's h11 protocol with a read timeout, a connection limit and JSON errors; `http_protocol` makes
    the class for one server (uvicorn builds one instance per connection, passing only its config)."""

    read_timeout: float = READ_TIMEOUT_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    opened: dict[Connection, None]  # this server's connections, oldest first (a dict keeps insertion order)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.opened[self] = None
        self._arm()
        if len(self.opened) > self.max_connections:
            self._make_room()

    def connection_lost(self, exc) -> None:
        self.opened.pop(self, None)
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.read_timer is None and self.conn.their_state is h11.IDLE:  # a new request begins
            self._arm()
        super().data_received(data)
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):  # read whole (or the connection ended)
            self._disarm()

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse: a JSON 400 instead of uvicorn's plain text (uvicorn logged it)."""
        message = "invalid HTTP request: the request line, a header or the chunked body is malformed"
        self._close_with(raw_error(400, message, "invalid_http_request"))

    def _close_with(self, response: bytes) -> None:
        """Answer with `response` if nothing has been answered on this request yet, then close."""
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app's sends become no-ops; its receive returns a disconnect
            self.cycle.message_event.set()
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE) and not (self.cycle and self.cycle.response_started):
            self.transport.write(response)
        self.transport.close()

    def _arm(self) -> None:
        self._disarm()
        self.read_timer = self.loop.call_later(self.read_timeout, self._read_timed_out)

    def _disarm(self) -> None:
        if self.read_timer is not None:
            self.read_timer.cancel()
            self.read_timer = None

    def _read_timed_out(self) -> None:
        self.read_timer = None
        if self.transport.is_closing():
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        self.logger.warning("closed the connection from %s: no whole request within %g s", client, self.read_timeout)
        if self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]:
            self.transport.close()  # it never said anything: nothing to answer
            return
        message = f"the request was not received whole within {self.read_timeout:g} seconds"
        self._close_with(raw_error(408, message, "request_timeout"))

    def _make_room(self) -> None:
        """Over the limit: close the oldest connection not being answered, else refuse this one."""
        for evictable, kind in ((Connection._idle, "idle one"), (Connection._sending, "one still sending its request")):
            oldest = next((c for c in self.opened if c is not self and evictable(c)), None)
            if oldest is not None:
                self.opened.pop(oldest)
                self.logger.warning("%d connections open: closed the oldest %s", self.max_connections, kind)
                oldest._close_with(b"")
                return
        self.opened.pop(self)
        self.logger.warning("%d connections open, all answering: refused a new one (503)", self.max_connections)
        message = f"the server holds {self.max_connections} connections, all being answered; try again shortly"
        self._close_with(raw_error(503, message, "too_many_connections", "server_error", retry_after=1))

    def _idle(self) -> bool:
        return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

    def _sending(self) -> bool:
        return self.conn.their_state is h11.SEND_BODY and not (self.cycle and self.cycle.response_started)


def http_protocol(read_timeout: float = READ_TIMEOUT_S, max_connections: int = DEFAULT_MAX_CONNECTIONS):
    """The protocol class for one server: uvicorn's `Config(http=...)`."""
    settings = {"read_timeout": read_timeout, "max_connections": max_connections, "opened": {}}
    return type("ServeConnection", (Connection,), settings)


def _host_name(value: str) -> str:
    """The name in a Host header (or an `--allowed-hosts` entry), without its port, in one spelling."""
    value = value.strip().lower()
    if value.startswith("["):
        name = value[1 : value.find("]")] if "]" in value else value[1:]
    else:
        name = value.partition(":")[0] if value.count(":") == 1 else value
    name = name.rstrip(".")
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return name
    return str(getattr(address, "ipv4_mapped", None) or address)


def _is_loopback(name: str) -> bool:
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind_host: str, option: str | None) -> frozenset[str] | None:
    """The Host names `Gate` accepts beyond loopback ones and the connection's own address; None: any.

    `option` is `--allowed-hosts` (`HOST[,HOST...]` or `*`); without it, a server bound to a loopback
    address accepts only those, and one bound elsewhere (which needs an API key) accepts any."""
    bound = _host_name(bind_host)
    if option is None:
        return frozenset({bound}) if _is_loopback(bound) else None
    names = [_host_name(entry) for entry in option.split(",") if entry.strip()]
    if not names:
        raise QwenMLXError("--allowed-hosts needs HOST[,HOST...] or '*'")
    if "*" in names:
        return None
    wildcard = bound in ("0.0.0.0", "::", "")
    return frozenset(names) | (frozenset() if wildcard else {bound})


class Gate:
    """ASGI middleware in front of the whole app: the Host header and a body's framing, before any route,
    the API key or the body cap (`server.Guard`)."""

    def __init__(self, app, hosts: frozenset[str] | None):
        self.app, self.hosts = app, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        names = [name for name, _ in scope["headers"]]
        if b"content-length" in names and b"transfer-encoding" in names:
            message = "send Content-Length or Transfer-Encoding, not both: the body's length is ambiguous"
            return await self._refuse(scope, receive, send, message, "ambiguous_framing", close=True)
        host = next((value for name, value in scope["headers"] if name == b"host"), None)
        if host is not None and not self.allows(host.decode("latin-1"), scope.get("server")):
            shown = host.decode("latin-1")[:200]
            message = (
                f"the Host header {shown!r} does not name this server: send a loopback address, or serve with "
                f"--allowed-hosts {_host_name(shown) or 'NAME'} to accept it"
            )
            return await self._refuse(scope, receive, send, message, "invalid_host")
        return await self.app(scope, receive, send)

    def allows(self, host: str, server) -> bool:
        """Whether a request with this Host header reached a name it may use (`server`: the local address)."""
        if self.hosts is None:
            return True
        name = _host_name(host)
        if _is_loopback(name) or name in self.hosts:
            return True
        return bool(server) and name == _host_name(str(server[0]))

    async def _refuse(self, scope, receive, send, message: str, code: str, close: bool = False):
        response = error_response(400, message, code=code, path=scope["path"])
        if close:  # h11 then closes after the answer, leaving the rest of the bytes unread
            response.headers["connection"] = "close"
        await response(scope, receive, send)


class OncePerInterval(logging.Filter):
    """Lets a log message through once per `interval_s`; the next one that passes says how many were held.

    Messages are told apart by their logger, level and format string (not the formatted text, which
    carries each client's address)."""

    def __init__(self, interval_s: float = LOG_INTERVAL_S):
        super().__init__()
        self.interval_s = interval_s
        self.last: dict[tuple, float] = {}
        self.held: dict[tuple, int] = {}
        self.lock = threading.Lock()  # the MLX thread logs too

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = time.monotonic()
        with self.lock:
            if now - self.last.get(key, -self.interval_s) < self.interval_s:
                self.held[key] = self.held.get(key, 0) + 1
                return False
            if len(self.last) > 1024:  # messages with their values inline would grow it without bound
                self.last.clear()
            self.last[key] = now
            held = self.held.pop(key, 0)
        if held:
            record.msg = f"{record.getMessage()} (and {held} more like it, not logged)"
            record.args = None
        return True


def quiet_logs(interval_s: float = LOG_INTERVAL_S) -> OncePerInterval:
    """Install `OncePerInterval` on uvicorn's and asyncio's loggers (after uvicorn has configured logging)."""
    once = OncePerInterval(interval_s)
    for name in LOGGERS:
        logging.getLogger(name).addFilter(once)
    return once
