"""exclude_paths: exact paths, "/prefix/*" for everything under one (issue 19's review: a prefix
match excluded ``/live/report``, a 24 MiB route, because ``/live`` is a default exclusion)."""

from __future__ import annotations

import pytest

from rtml_ebpf.admission.policy import Policy
from rtml_ebpf.errors import ConfigError


def test_default_exclusions_match_exact_paths_only() -> None:
    p = Policy("asgi", None, admission=False)
    assert p.excluded("/live") and p.excluded("/healthz") and p.excluded("/metrics")
    assert not p.excluded("/live/report") and not p.excluded("/metrics/astats") and not p.excluded("/lively")


def test_a_trailing_slash_star_excludes_everything_under_it() -> None:
    p = Policy("asgi", None, exclude=["/internal/*", "/ping"], admission=False)
    assert p.excluded("/internal") and p.excluded("/internal/a/b") and p.excluded("/ping")
    assert not p.excluded("/internals") and not p.excluded("/ping/x")


@pytest.mark.parametrize("bad", ["health", "/a*/b", ""])
def test_a_path_that_is_not_one_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="exclude_paths"):
        Policy("asgi", None, exclude=[bad], admission=False)


def test_flask_logs_no_traceback_for_an_ended_request_and_still_logs_other_errors(
        caplog: pytest.LogCaptureFixture) -> None:
    """The enforcer logs one line per ended request; Flask's "Exception on ..." traceback for the
    RequestMemoryExceeded it raised is filtered (other exceptions are still logged)."""
    flask = pytest.importorskip("flask")
    from rtml_ebpf.errors import RequestMemoryExceeded
    from rtml_ebpf.wsgi import MemoryLimitMiddleware

    app = flask.Flask("quiet")

    @app.get("/ended")
    def ended() -> str:
        raise RequestMemoryExceeded

    @app.get("/broken")
    def broken() -> str:
        raise ValueError("a bug")

    app.wsgi_app = MemoryLimitMiddleware(app.wsgi_app, admission=False)  # type: ignore[method-assign]
    client = app.test_client()
    with caplog.at_level("ERROR"):
        assert client.get("/ended").status_code == 500
        assert not [r for r in caplog.records if "Exception on" in r.getMessage()]
        assert client.get("/broken").status_code == 500
        assert [r for r in caplog.records if "Exception on /broken" in r.getMessage()]
