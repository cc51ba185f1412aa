"""A bad RTML_* value stops an integration built on the process default at construction, with
the ConfigError naming the variable and the fix (adversarial review D7): the module-level check
fails open on it by contract, but a middleware that did so ran its service unguarded, its OOM
kills as with no guard, and the log spoke of a call the user never made."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from rtml_ebpf import guard
from rtml_ebpf.asgi import MemoryLimitMiddleware as AsgiMiddleware
from rtml_ebpf.errors import ConfigError
from rtml_ebpf.grpc import AsyncMemoryLimitInterceptor, MemoryLimitInterceptor
from rtml_ebpf.wsgi import MemoryLimitMiddleware as WsgiMiddleware


async def asgi_app(scope: object, receive: object, send: object) -> None:
    return None


def wsgi_app(environ: object, start_response: object) -> list[bytes]:
    return []


BUILDERS: dict[str, Callable[[], object]] = {
    "asgi": lambda: AsgiMiddleware(asgi_app),
    "wsgi": lambda: WsgiMiddleware(wsgi_app),
    "grpc": lambda: MemoryLimitInterceptor(),
    "grpc.aio": lambda: AsyncMemoryLimitInterceptor(),
    "guard": lambda: guard(lambda: None),
}

BAD = [
    ("RTML_THRESHOLD", "90", "less than one page"),
    ("RTML_THRESHOLD", "abc", "RTML_THRESHOLD"),
    ("RTML_THRESHOLD", "1.5", "RTML_THRESHOLD"),
    ("RTML_METRIC", "rss", "RTML_METRIC"),
    ("RTML_BACKEND", "foo", "RTML_BACKEND"),
    ("RTML_FAIL_CLOSED", "maybe", "RTML_FAIL_CLOSED"),
    ("RTML_HOOKS", "bogus", "RTML_HOOKS"),
]


@pytest.mark.parametrize("integration", sorted(BUILDERS))
@pytest.mark.parametrize("name,value,said", BAD)
def test_a_bad_environment_value_is_a_config_error_at_construction(
        monkeypatch: pytest.MonkeyPatch, integration: str, name: str, value: str, said: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=said):
        BUILDERS[integration]()


@pytest.mark.parametrize("integration", sorted(BUILDERS))
def test_good_environment_values_build(monkeypatch: pytest.MonkeyPatch, integration: str) -> None:
    from rtml_ebpf import _default

    for name, value in (("RTML_THRESHOLD", "90%"), ("RTML_METRIC", "usage"), ("RTML_BACKEND", "poll"),
                        ("RTML_FAIL_CLOSED", "0")):
        monkeypatch.setenv(name, value)
    try:
        assert BUILDERS[integration]() is not None
    finally:
        _default._drop()  # the default built here from this environment is not the next test's
