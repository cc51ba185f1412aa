"""WSGI middleware (Flask, Django, any WSGI app): 503 before the app runs.

    from rtml_ebpf.wsgi import MemoryLimitMiddleware
    app.wsgi_app = MemoryLimitMiddleware(app.wsgi_app)      # Flask

Each request is admitted by memory budget (see rtml_ebpf.admission): its estimated cost (scaled
by its body's Content-Length) plus what other requests of every worker reserved must fit below
the threshold. The request ends (and its cost is learned) when the server closes the response
iterable. A request the enforcer ends (it overran its reservation while the cgroup neared the OOM
killer) gets 503 when it is ended before the app returns its response.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from .admission import Admission, Ticket
from .admission.body import GatedInput, chunked
from .admission.estimator import route_key
from .admission.follow import clear_async_exception
from .admission.policy import (
    DEFAULT_EXCLUDE_PATHS,
    ENDED_BODY,
    REJECTION_BODY,
    Policy,
    content_length,
    record_ended,
    record_rejection,
)
from .errors import RequestMemoryExceeded
from .limiter import Limiter
from .orca import HTTP_FORMATS, LoadReporter, check_format

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

REASONS = {503: "Service Unavailable", 429: "Too Many Requests"}
# A 503 sent while the client is still sending its body: once it is out, the rest is read and
# dropped, within these bounds, before the server closes (a close with bytes unread resets the
# connection, and a client still sending gets the reset instead of the 503: http.client, 0 of 10
# 64 MiB chunked uploads refused on gunicorn). Only where the server's socket is known
# (gunicorn's environ["gunicorn.socket"]): a read may then wait DRAIN_IDLE at most.
DRAIN_BYTES = 64 << 20
DRAIN_SECONDS = 10.0
DRAIN_IDLE = 1.0


def _in_app(ticket: Ticket, inside: bool) -> None:
    """The request's thread enters (``inside``) or leaves the app's code. Outside it runs the
    server's (gunicorn writing the headers and the body): the enforcer does not raise there, where
    the exception became the server's 500 with a traceback. Leaving, an exception raised as the
    app's code ended and not fired yet is dropped. An ended request whose body generator still
    runs is raised in again inside next() (the enforcer's end_again, while the cgroup is short)."""
    acc = ticket.account
    with acc.lock:
        ticket.outside = not inside
        ended = ticket.ended and not ticket.finished
    if ended and not inside:
        clear_async_exception(threading.get_ident())


class _Finishing:
    """The app's response iterable, ending the request's ticket when the server closes it."""

    def __init__(self, body: Iterable[bytes], admission: Admission, ticket: Ticket) -> None:
        self._body = body
        self._admission = admission
        self._ticket: Ticket | None = ticket
        _in_app(ticket, False)  # the app returned: the server's code from here, but for next()

    def __iter__(self) -> Iterator[bytes]:
        ticket = self._ticket
        return iter(self._body) if ticket is None else self._running(iter(self._body), ticket)

    @staticmethod
    def _running(body: Iterator[bytes], ticket: Ticket) -> Iterator[bytes]:
        """The body, each next() in the app's code (a generator may still allocate there)."""
        while True:
            _in_app(ticket, True)
            try:
                chunk = next(body)
            except StopIteration:
                return
            finally:
                _in_app(ticket, False)
            yield chunk

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            ticket, self._ticket = self._ticket, None
            if ticket is not None:
                self._admission.finish(ticket)


class MemoryLimitMiddleware:
    """The WSGI twin of :class:`rtml_ebpf.asgi.MemoryLimitMiddleware`, same arguments (the
    ORCA header included: ``load_report``)."""

    def __init__(
        self,
        app: WSGIApp,
        limiter: Limiter | None = None,
        *,
        exclude_paths: Iterable[str] = DEFAULT_EXCLUDE_PATHS,
        shed_at: str = "hard",
        retry_after: tuple[int, int] = (1, 5),
        status_code: int = 503,
        admission: bool | Admission = True,
        request_bytes: int | None = None,
        route_costs: Mapping[str, int] | None = None,
        cost_per_byte: float | Mapping[str, float] | None = None,
        load_report: bool | str | None = None,
    ) -> None:
        self.app = app
        self.policy = Policy("wsgi", limiter, shed_at=shed_at, exclude=exclude_paths, retry_after=retry_after,
                             admission=admission, request_bytes=request_bytes, route_costs=route_costs,
                             cost_per_byte=cost_per_byte)
        self.report = LoadReporter(limiter, check_format(load_report, HTTP_FORMATS, "text"))
        self.status = f"{status_code} {REASONS.get(status_code, 'Rejected')}"
        quiet_ended(app)

    @property
    def admission(self) -> Admission | None:
        return self.policy.admission

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if self.report.fmt is not None:
            start_response = self._reporting(start_response)
        te = environ.get("HTTP_TRANSFER_ENCODING")
        size = None if chunked(te) else content_length(environ.get("CONTENT_LENGTH"))  # TE wins (RFC 9112 6.3)
        has_body = size is None and te is not None or bool(size)
        shed, ticket = self.policy.admit(path, route_key(environ.get("REQUEST_METHOD", "GET"), path), size=size,
                                         body=has_body)
        if shed:
            return self._reject(start_response, self.policy.rejection_body(), close=has_body and _may_close(environ),
                                unread=_unread(environ, None) if has_body else None)
        admission = self.policy.admission
        if ticket is None or admission is None:
            return self.app(environ, start_response)
        gated: GatedInput | None = None
        raw: Any = None
        if te is not None or ticket.pending:
            gated = GatedInput(environ.get("wsgi.input"), admission, ticket, size)
            raw, environ["wsgi.input"] = environ.get("wsgi.input"), gated
        replaced: list[bool] = []

        def start_response_guarded(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            # A framework that turns the exception into its own 500 (Flask, Django) still answers
            # what happened: the request was ended, retry later.
            if (ticket.ended or ticket.refused) and status[:1] == "5" or (
                    ticket.pending and not admission.take_slot(ticket)):  # it answers without its body
                replaced.append(True)
                return start_response(self.status, self._headers(self._refused(ticket, count=False),
                                                                 ticket.refused and _may_close(environ)), exc_info)
            return start_response(status, headers, exc_info) if exc_info else start_response(status, headers)

        try:
            body = self.app(environ, start_response_guarded)
            if replaced:
                close = getattr(body, "close", None)
                if close is not None:
                    close()
                del body, close  # the app's error response may hold the ended request's exception
                admission.finish(ticket)
                refused = self._refused(ticket)
                unread = None if gated is None or gated.done else _unread(environ, raw)
                return [refused] if unread is None else _Drained(refused, *unread)
        except RequestMemoryExceeded:
            admission.finish(ticket)
            # start_response may have been called by the app: with exc_info it is replaced (WSGI
            # allows that until the headers are sent; after that the server drops the connection).
            return self._reject(start_response, self._refused(ticket), sys.exc_info(),
                                close=ticket.refused and _may_close(environ),
                                unread=None if gated is None or gated.done else _unread(environ, raw))
        except BaseException:
            admission.finish(ticket)
            raise
        return _Finishing(body, admission, ticket)

    def _reporting(self, start_response: StartResponse) -> StartResponse:
        report = self.report
        report.count()

        def start_response_with_report(status: str, headers: list[tuple[str, str]], *args: Any) -> Any:
            header = report.header()
            if header is not None and isinstance(header[1], str):
                headers = [*headers, (header[0], header[1])]
            return start_response(status, headers, *args)

        return start_response_with_report

    def _refused(self, ticket: Ticket, count: bool = True) -> bytes:
        """What to answer a request stopped after admission: refused as its body grew, or ended."""
        if ticket.refused:  # (a pending request that could not take its slot is ended too: refused)
            if count:
                record_rejection("wsgi")
            return self.policy.rejection_body(ticket)
        if count:
            record_ended("wsgi")
        return ENDED_BODY

    def _headers(self, body: bytes, close: bool = False) -> list[tuple[str, str]]:
        headers = [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Retry-After", str(self.report.retry_after(self.policy.retry_after_seconds))),
        ]
        if close:
            # The body was not read: a server that honours it closes the connection instead of
            # reading the body it would otherwise drain (gunicorn drops the header and drains).
            headers.append(("Connection", "close"))
        return headers

    def _reject(self, start_response: StartResponse, body: bytes = REJECTION_BODY,
                exc_info: Any = None, close: bool = False, unread: tuple[Any, socket.socket] | None = None
                ) -> Iterable[bytes]:
        """503; ``unread``: the request's body stream, still coming, and the server's socket: the
        rest is dropped after the 503 is out (_Drained)."""
        headers = self._headers(body, close)
        if exc_info is not None:
            start_response(self.status, headers, exc_info)
        else:
            start_response(self.status, headers)
        return [body] if unread is None else _Drained(body, *unread)


def _unread(environ: dict[str, Any], stream: Any) -> tuple[Any, socket.socket] | None:
    """(the raw body stream, the server's socket) to drain, when the server says its socket."""
    sock = environ.get("gunicorn.socket")
    stream = environ.get("wsgi.input") if stream is None else stream
    return (stream, sock) if isinstance(sock, socket.socket) and stream is not None else None


class _Drained:
    """A 503's body; once the server has sent it and closes the iterable, the rest of the
    request's body is read and dropped (DRAIN_BYTES, DRAIN_SECONDS, DRAIN_IDLE between reads)."""

    def __init__(self, body: bytes, stream: Any, sock: socket.socket) -> None:
        self._body, self._stream, self._sock = body, stream, sock

    def __iter__(self) -> Iterator[bytes]:
        return iter([self._body])

    def close(self) -> None:
        deadline, read = time.monotonic() + DRAIN_SECONDS, 0
        try:
            was = self._sock.gettimeout()
            self._sock.settimeout(DRAIN_IDLE)
        except OSError:
            return
        try:
            while read <= DRAIN_BYTES and time.monotonic() < deadline:
                data = self._stream.read(65536)
                if not data:
                    return
                read += len(data)
        except Exception:  # noqa: BLE001 - a timeout, a reset, a malformed chunk: the server closes
            return
        finally:
            try:
                self._sock.settimeout(was)
            except OSError:
                pass


def _may_close(environ: dict[str, Any]) -> bool:
    """Whether the app may send ``Connection: close`` (a hop-by-hop header): wsgiref's server
    asserts on it (PEP 3333 leaves such headers to the server)."""
    return not str(environ.get("SERVER_SOFTWARE", "")).startswith("WSGIServer/")


class _EndedFilter(logging.Filter):
    """Drops a framework's "Exception on ..." traceback for a request that was ended or refused:
    the enforcer already logged one line for it (route, bytes, estimate), and it is counted."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        leaves = getattr(exc, "exceptions", None)  # an exception group (anyio's task groups wrap it)
        if isinstance(leaves, tuple) and leaves:
            return not all(isinstance(leaf, RequestMemoryExceeded) for leaf in leaves)
        return not isinstance(exc, RequestMemoryExceeded)


ENDED_FILTER = _EndedFilter()


def quiet_ended(app: object = None, *loggers: logging.Logger) -> None:
    """Keep the frameworks' error logs to one line per ended request: filter the traceback Flask
    (the app's logger, found from ``app.wsgi_app``) and Django (``django.request``) log for
    RequestMemoryExceeded. The middlewares call it (the ASGI one with the servers' error loggers);
    call it with other loggers to quiet them."""
    owner = getattr(app, "__self__", None)  # Flask: MemoryLimitMiddleware(app.wsgi_app)
    found = [lg for lg in (getattr(owner, "logger", None),) if isinstance(lg, logging.Logger)]
    if "django" in sys.modules:
        found.append(logging.getLogger("django.request"))
    for logger in (*found, *loggers):
        if ENDED_FILTER not in logger.filters:
            logger.addFilter(ENDED_FILTER)
