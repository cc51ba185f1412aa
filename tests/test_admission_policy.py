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
