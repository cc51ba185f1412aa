"""The enforcer ends a WSGI request in the app's code, never in the server's: once the app has
returned, its thread runs the server's code (gunicorn writing the headers and the body), where
RequestMemoryExceeded became the server's 500 with a traceback (helper-22's D3 floods: 2 of them).
Only while the response iterable's next() runs the app's code (a generator may still allocate)
is the exception raised there. Real threads, real asynchronous exceptions, a real (poll) limiter."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rtml_ebpf import Admission, Limiter
from rtml_ebpf.admission import enforce
from rtml_ebpf.errors import RequestMemoryExceeded
from rtml_ebpf.wsgi import _Finishing


def spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:  # Python bytecode: where an asynchronous exception lands
        pass


def test_ended_in_the_servers_code_it_is_raised_only_in_the_apps(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RTML_LEDGER_DIR", str(tmp_path))
    in_server = threading.Event()
    ended = threading.Event()
    in_app = threading.Event()
    seen: dict[str, object] = {}

    def body() -> Iterator[bytes]:
        yield b"first"
        in_app.set()
        spin(5)  # a generator still working: it is ended here
        yield b"never"

    with Limiter(backend="poll", relief=False) as lim:
        adm = Admission(lim, request_bytes=1 << 20, enforce=False)

        def request() -> None:
            ticket = adm.try_admit("GET /x")
            assert ticket is not None
            seen["ticket"] = ticket
            response = _Finishing(body(), adm, ticket)  # the app returned its iterable
            try:
                in_server.set()
                ended.wait(5)
                spin(0.3)  # the server's code: writing the headers
                seen["server"] = "wrote"
                chunks = []
                for chunk in response:
                    chunks.append(chunk)
                seen["app"] = "finished"
            except RequestMemoryExceeded:
                seen["app"] = "ended"
            finally:
                response.close()

        worker = threading.Thread(target=request)
        worker.start()
        assert in_server.wait(5)
        assert enforce.end(seen["ticket"])  # type: ignore[arg-type]
        ended.set()
        assert in_app.wait(5)
        time.sleep(0.05)
        enforce.end_again(seen["ticket"])  # type: ignore[arg-type]
        worker.join(10)
        adm.close()
    assert seen.get("server") == "wrote", seen  # the server's code was not interrupted
    assert seen.get("app") == "ended", seen  # the app's generator was
