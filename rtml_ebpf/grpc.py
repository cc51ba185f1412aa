"""gRPC server interceptors: reject calls before their request is decoded.

    server = grpc.server(pool, interceptors=[MemoryLimitInterceptor()])
    server = grpc.aio.server(interceptors=[AsyncMemoryLimitInterceptor()])

By default a rejected call ends with UNAVAILABLE, which gRPC clients retry
under their retry policy. ``code="resource_exhausted"`` ends it with
RESOURCE_EXHAUSTED and a google.rpc.RetryInfo detail (jittered delay), as the
OpenTelemetry collector does. Health checks are never shed.

``load_report=True`` (or ``"bin"``, ``"text"``, ``"json"``) ends every call with an ORCA
load report in its trailing metadata, the per-call metrics gRPC's weighted round robin
reads (rtml_ebpf.orca); the delay of a rejection follows the measured drain rate where one
is known.

Each request message's bytes grow the call's reservation as it is decoded (its cost scales with
its size); a message whose grown reservation no longer fits is not decoded and its call is refused
(the code and details of any refusal) before the handler gets it. A call the enforcer ends (it
overran its reservation while the cgroup neared the OOM killer) ends with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any

import grpc  # the grpcio package (extra: rtml-ebpf[grpc])

from .admission import Admission, Ticket
from .admission.body import BodyRefused
from .admission.policy import Policy, record_ended, record_rejection
from .errors import ConfigError, RequestMemoryExceeded
from .limiter import Limiter
from .orca import GRPC_FORMATS, LoadReporter, check_format

DEFAULT_EXCLUDE_METHODS = ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch")
DETAILS = "memory limit reached, retry later"
TOO_LARGE_DETAILS = ("request too large for this service's memory limit: the memory its messages are estimated to "
                     "need exceeds what the service has ever had free; retrying will not help")
ENDED_DETAILS = "memory limit reached: this call was ended to keep the server from being OOM-killed, retry later"
CODES = {"unavailable": grpc.StatusCode.UNAVAILABLE, "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED}


def _retry_info_status(code: grpc.StatusCode, delay_s: int) -> bytes:
    """A serialized google.rpc.Status carrying RetryInfo, for grpc-status-details-bin."""
    from google.protobuf import any_pb2, duration_pb2
    from google.rpc import code_pb2, error_details_pb2, status_pb2

    info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=delay_s))
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=DETAILS, details=[detail])
    return bytes(status.SerializeToString())


class _Rejecter:
    """Validated settings and the metadata of a rejection, shared by both interceptors."""

    def __init__(self, integration: str, limiter: Limiter | None, code: str, exclude_methods: Iterable[str],
                 shed_at: str, retry_after: tuple[int, int], admission: bool | Admission = True,
                 request_bytes: int | None = None, route_costs: Mapping[str, int] | None = None,
                 load_report: bool | str | None = None) -> None:
        if code not in CODES:
            raise ConfigError(f"code={code!r}: use 'unavailable' (default) or 'resource_exhausted'")
        if code == "resource_exhausted":
            try:
                _retry_info_status(grpc.StatusCode.RESOURCE_EXHAUSTED, 1)
            except ImportError as exc:
                raise ConfigError(
                    "code='resource_exhausted' sends RetryInfo and needs googleapis-common-protos; "
                    "pip install 'rtml-ebpf[grpc]'"
                ) from exc
        self.code = CODES[code]
        self.policy = Policy(integration, limiter, shed_at=shed_at, exclude=exclude_methods,
                             retry_after=retry_after, admission=admission, request_bytes=request_bytes,
                             route_costs=route_costs)
        self.report = LoadReporter(limiter, check_format(load_report, GRPC_FORMATS, "bin"))

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        delay = self.report.retry_after(self.policy.retry_after_seconds)
        load = self.report.header()
        md: tuple[tuple[str, str | bytes], ...] = (("retry-after", str(delay)),) + (() if load is None else (load,))
        if self.code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            return (("grpc-status-details-bin", _retry_info_status(self.code, delay)), *md)
        return md


def _add_report(context: Any, report: LoadReporter) -> None:
    """Appends the call's load report to whatever trailing metadata the handler set."""
    load = report.header()
    if load is None:
        return
    get = getattr(context, "trailing_metadata", None)
    existing = tuple(get() or ()) if get is not None else ()
    context.set_trailing_metadata((*existing, load))


def _reporting(handler: Any, report: LoadReporter) -> Any:
    """The same handler, its call ended by the load report (sync or asyncio behaviour)."""
    kind = _kind(handler)
    inner = getattr(handler, kind)
    if inspect.isasyncgenfunction(inner):
        async def async_streaming(request: Any, context: Any) -> AsyncIterator[Any]:
            async for item in inner(request, context):
                yield item
            _add_report(context, report)

        behaviour: Callable[..., Any] = async_streaming
    elif inspect.iscoroutinefunction(inner):
        async def async_unary(request: Any, context: Any) -> Any:
            result = await inner(request, context)
            _add_report(context, report)
            return result

        behaviour = async_unary
    elif kind.endswith("_stream"):
        def streaming(request: Any, context: Any) -> Iterator[Any]:
            yield from inner(request, context)
            _add_report(context, report)

        behaviour = streaming
    else:
        def unary(request: Any, context: Any) -> Any:
            result = inner(request, context)
            if inspect.iscoroutine(result):  # an asyncio handler written as a plain function
                async def finish() -> Any:
                    value = await result
                    _add_report(context, report)
                    return value

                return finish()
            _add_report(context, report)
            return result

        behaviour = unary
    return _like(handler, behaviour, decode=True)


def _kind(handler: Any) -> str:
    """unary_unary, unary_stream, stream_unary or stream_stream: which behaviour it carries."""
    for kind in ("unary_unary", "unary_stream", "stream_unary"):
        if getattr(handler, kind):
            return kind
    return "stream_stream"


def _like(handler: Any, behaviour: Callable[..., Any], *, decode: bool = False,
          sized: _Sized | None = None) -> Any:
    """A handler of the same shape as ``handler`` that runs ``behaviour``. Without ``decode``
    requests are not deserialized: a rejected call never pays for decoding its payload. With
    ``sized``, each request message's bytes grow the call's reservation as it is decoded (its
    size class, see rtml_ebpf.admission.estimator), before the handler allocates."""
    make = getattr(grpc, f"{_kind(handler)}_rpc_method_handler")
    deserializer = handler.request_deserializer if decode else None
    if sized is not None:
        deserializer = sized.deserializer(deserializer)
    return make(behaviour, request_deserializer=deserializer, response_serializer=handler.response_serializer)


class _Refused:
    """What the deserializer hands on instead of a message the budget refused (never None: gRPC
    answers INTERNAL for a None request)."""


REFUSED = _Refused()


class _Sized:
    """One admitted call's request messages as they are decoded: their bytes so far grow its
    reservation (Admission.body_read); a message whose grown reservation no longer fits is not
    decoded and the call is refused before its handler sees it. ``raising``: a refused message
    raises BodyRefused where the handler reads (grpc.aio streams: its ``async for`` and
    ``context.read()``); else it becomes REFUSED (unary requests, and sync streams, whose messages
    are decoded on the server's polling thread, where an exception only becomes INTERNAL)."""

    __slots__ = ("admission", "ticket", "rejecter", "raising", "seen", "refused", "why")

    def __init__(self, admission: Admission, ticket: Ticket, rejecter: _Rejecter, raising: bool = False) -> None:
        self.admission, self.ticket, self.rejecter, self.raising = admission, ticket, rejecter, raising
        self.seen = 0
        self.refused = False
        self.why: str | None = None

    def deserializer(self, decode: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
        def deserialize(raw: bytes) -> Any:
            if not self.refused:
                self.seen += len(raw)
                if not self.admission.body_read(self.ticket, self.seen):
                    # The reason is this thread's (the one body_read just refused on).
                    self.refused, self.why = True, self.admission.refusal()
            if self.refused:
                if self.raising:
                    raise BodyRefused
                return REFUSED
            return raw if decode is None else decode(raw)

        return deserialize

    def messages(self, requests: Iterator[Any]) -> Iterator[Any]:
        """A sync stream's messages, up to the one that did not fit (BodyRefused there)."""
        for message in requests:
            if message is REFUSED:
                raise BodyRefused
            yield message

    def answer(self) -> tuple[grpc.StatusCode, str]:
        """The refusal's status, as for a call refused at the door (counted once)."""
        record_rejection(self.rejecter.policy.integration)
        return self.rejecter.code, TOO_LARGE_DETAILS if self.why == "too_large" else DETAILS

    def refuse(self, context: Any) -> None:
        """Ends the sync call as refused (abort raises)."""
        code, details = self.answer()
        context.set_trailing_metadata(self.rejecter.trailing_metadata())
        context.abort(code, details)

    async def refuse_async(self, context: Any) -> None:
        code, details = self.answer()
        await context.abort(code, details, trailing_metadata=self.rejecter.trailing_metadata())


def _ended(context: Any) -> None:
    """The enforcer ended this call: RESOURCE_EXHAUSTED (abort raises)."""
    record_ended("grpc")
    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, ENDED_DETAILS)


def _with_ticket(handler: Any, admission: Admission, ticket: Ticket, rejecter: _Rejecter) -> Any:
    """The same handler (request decoding included) whose behaviour runs under ``ticket``:
    bound to the pool thread that runs it, finished when the call's work ends. A call whose
    message's size no longer fits its reservation is refused before its handler gets it."""
    kind = _kind(handler)
    inner = getattr(handler, kind)
    sized = _Sized(admission, ticket, rejecter)
    streamed = kind.startswith("stream_")

    def run(request: Any, context: Any) -> Any:
        if request is REFUSED:
            sized.refuse(context)
        return inner(sized.messages(request) if streamed else request, context)

    def stopped(context: Any) -> None:
        """RequestMemoryExceeded came out of the handler: refused as its messages grew, or ended."""
        if sized.refused:
            sized.refuse(context)
        _ended(context)

    if kind.endswith("_stream"):
        def streaming(request: Any, context: Any) -> Iterator[Any]:
            admission.bind(ticket)
            try:
                yield from run(request, context)
            except RequestMemoryExceeded:
                stopped(context)
            finally:
                admission.finish(ticket)
            if sized.refused:  # the handler swallowed BodyRefused: still refused
                sized.refuse(context)

        behaviour: Callable[..., Any] = streaming
    else:
        def unary(request: Any, context: Any) -> Any:
            admission.bind(ticket)
            result = None
            try:
                result = run(request, context)
            except RequestMemoryExceeded:
                stopped(context)
            finally:
                admission.finish(ticket)
            if sized.refused:
                sized.refuse(context)
            return result

        behaviour = unary
    return _like(handler, behaviour, decode=True, sized=sized)


class MemoryLimitInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Sync server interceptor (``grpc.server(..., interceptors=[...])``). The verdict and the
    budget are checked before the request is decoded; an admitted call reserves its route's
    estimated cost until its handler returns (or its response stream ends)."""

    def __init__(
        self,
        limiter: Limiter | None = None,
        *,
        code: str = "unavailable",
        exclude_methods: Iterable[str] = DEFAULT_EXCLUDE_METHODS,
        shed_at: str = "hard",
        retry_after: tuple[int, int] = (1, 5),
        admission: bool | Admission = True,
        request_bytes: int | None = None,
        route_costs: Mapping[str, int] | None = None,
        load_report: bool | str | None = None,
    ) -> None:
        self._r = _Rejecter("grpc", limiter, code, exclude_methods, shed_at, retry_after, admission,
                            request_bytes, route_costs, load_report)

    @property
    def admission(self) -> Admission | None:
        return self._r.policy.admission

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return handler
        # Sync: the pool thread that runs the call binds the ticket (Admission.bind).
        shed, ticket = self._r.policy.admit(handler_call_details.method, handler_call_details.method, bind=False)
        r = self._r
        admission = r.policy.admission
        if ticket is not None and admission is not None:
            handler = _with_ticket(handler, admission, ticket, r)
        if r.report.fmt is not None and not r.policy.excluded(handler_call_details.method):
            r.report.count()
            if not shed:
                return _reporting(handler, r.report)
        if not shed:
            return handler

        def reject(request: Any, context: grpc.ServicerContext) -> Any:
            context.set_trailing_metadata(r.trailing_metadata())
            context.abort(r.code, DETAILS)

        return _like(handler, reject)


class AsyncMemoryLimitInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """asyncio server interceptor (``grpc.aio.server(interceptors=[...])``). Calls share the
    event loop's thread: each admitted call's coroutine is metered step by step."""

    def __init__(
        self,
        limiter: Limiter | None = None,
        *,
        code: str = "unavailable",
        exclude_methods: Iterable[str] = DEFAULT_EXCLUDE_METHODS,
        shed_at: str = "hard",
        retry_after: tuple[int, int] = (1, 5),
        admission: bool | Admission = True,
        request_bytes: int | None = None,
        route_costs: Mapping[str, int] | None = None,
        load_report: bool | str | None = None,
    ) -> None:
        self._r = _Rejecter("grpc_aio", limiter, code, exclude_methods, shed_at, retry_after, admission,
                            request_bytes, route_costs, load_report)

    @property
    def admission(self) -> Admission | None:
        return self._r.policy.admission

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], handler_call_details: Any
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        shed, ticket = self._r.policy.admit(handler_call_details.method, handler_call_details.method, stepped=True)
        admission = self._r.policy.admission
        r = self._r
        if ticket is not None and admission is not None:
            handler = _with_async_ticket(handler, admission, ticket, r)
        if r.report.fmt is not None and not r.policy.excluded(handler_call_details.method):
            r.report.count()
            if not shed:
                return _reporting(handler, r.report)
        if not shed:
            return handler

        async def reject(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(r.code, DETAILS, trailing_metadata=r.trailing_metadata())

        if handler.unary_stream or handler.stream_stream:
            async def reject_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await context.abort(r.code, DETAILS, trailing_metadata=r.trailing_metadata())
                yield  # pragma: no cover - makes this an async generator, as stream handlers are

            return _like(handler, reject_stream)
        return _like(handler, reject)


def _with_async_ticket(handler: Any, admission: Admission, ticket: Ticket, rejecter: _Rejecter) -> Any:
    kind = _kind(handler)
    inner = getattr(handler, kind)
    # A refused message of a request stream raises where the handler reads it (async for, or
    # context.read()); a refused unary request becomes REFUSED and the handler is not called.
    sized = _Sized(admission, ticket, rejecter, raising=kind.startswith("stream_"))

    async def stopped(context: Any) -> None:
        if sized.refused:
            await sized.refuse_async(context)
        else:
            record_ended("grpc_aio")
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, ENDED_DETAILS)

    if kind.endswith("_stream"):
        async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                if request is REFUSED:
                    await sized.refuse_async(context)
                # Each step to the next response message is metered to the call (Stepped), as a
                # unary coroutine is: unmetered, a streaming answer's memory was in no budget.
                items = inner(request, context)
                while True:
                    try:
                        item = await admission.run_async(ticket, items.__anext__())
                    except StopAsyncIteration:
                        break
                    yield item
            except RequestMemoryExceeded:
                await stopped(context)
            finally:
                admission.finish(ticket)
            if sized.refused:  # the handler swallowed BodyRefused: still refused
                await sized.refuse_async(context)

        behaviour: Callable[..., Any] = streaming
    else:
        async def unary(request: Any, context: Any) -> Any:
            result = None
            try:
                if request is REFUSED:
                    await sized.refuse_async(context)
                result = inner(request, context)
                if inspect.iscoroutine(result):
                    result = await admission.run_async(ticket, result)
            except RequestMemoryExceeded:
                await stopped(context)
            finally:
                admission.finish(ticket)
            if sized.refused:
                await sized.refuse_async(context)
            return result

        behaviour = unary
    return _like(handler, behaviour, decode=True, sized=sized)
