"""Fault matrix, inputs: every parser, RTML_* value and CLI flag, fuzzed. Bad input is a
ConfigError / CgroupNotFound (exit codes 2 / 3), never a traceback or a silent accept."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtml_ebpf import CgroupNotFound, ConfigError, Limiter, RtmlError, _cgroup, config
from rtml_ebpf.cli import main

texts = st.text(max_size=24) | st.sampled_from(
    ["infMi", "1e400Mi", "nan", "-1", "0", "1.5", "90%", "512Mi", "2**76", "1e3", "", " ", "0x10", "\\999"])


@settings(max_examples=300, deadline=None)
@given(text=texts)
def test_threshold_text_is_a_threshold_or_a_config_error(text: str) -> None:
    try:
        t = config.parse_threshold_text(text)
    except ConfigError:
        return
    assert (t.ppm is not None and 0 < t.ppm <= 1_000_000) or (t.nbytes is not None and
                                                                4096 <= t.nbytes < config.MAX_THRESHOLD_BYTES)


@settings(max_examples=200, deadline=None)
@given(value=st.one_of(st.integers(), st.floats(allow_nan=True), st.text(max_size=8), st.none(), st.booleans()))
def test_limiter_arguments_raise_config_error_only(value: object) -> None:
    for kwargs in ({"threshold": value}, {"hysteresis": value}, {"poll_interval": value}, {"metric": value},
                   {"backend": value}, {"fail_closed": value}):
        try:
            Limiter(**kwargs, relief=False).close()  # type: ignore[arg-type]
        except (ConfigError, CgroupNotFound):
            pass
        except RtmlError:
            pass  # e.g. backend='ebpf' without privileges: documented errors only


@pytest.mark.parametrize("value", ["garbage", "2", "y", "enabled", "truthy"])
def test_13_nonsense_booleans_are_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="RTML_FAIL_CLOSED"):
        config.env_settings({"RTML_FAIL_CLOSED": value})
    with pytest.raises(ConfigError, match="fail_closed"):
        Limiter(backend="poll", fail_closed=value, relief=False)  # type: ignore[arg-type]


def test_13_string_booleans_mean_what_they_say() -> None:
    with Limiter(backend="poll", fail_closed="false", relief=False) as lim:  # type: ignore[arg-type]
        assert lim._fail_answer is False
    assert config.env_settings({"RTML_FAIL_CLOSED": "1"}).fail_closed is True


@settings(max_examples=100, deadline=None)
@given(env=st.dictionaries(st.sampled_from(["RTML_THRESHOLD", "RTML_METRIC", "RTML_BACKEND", "RTML_FAIL_CLOSED",
                                            "RTML_HOOKS"]), texts, max_size=3))
def test_environment_values_are_settings_or_config_errors(env: dict[str, str]) -> None:
    try:
        config.env_settings(env)
        config.env_hooks(env)
    except ConfigError:
        pass


@settings(max_examples=60, deadline=None)
@given(flag=st.sampled_from(["--threshold", "--metric", "--backend", "--pid", "--cgroup"]), value=texts)
def test_12_cli_flags_exit_with_codes_not_tracebacks(flag: str, value: str) -> None:
    try:
        code = main(["status", flag, value, "--json"])
    except SystemExit as exc:  # argparse's own refusal: exit 2 with usage
        assert exc.code == 2
        return
    assert code in (0, 1, 2, 3, 4, 5)


def test_12_cli_infinite_threshold_exits_2() -> None:
    for bad in ("infMi", "1e400Mi"):
        out = subprocess.run([sys.executable, "-m", "rtml_ebpf.cli", "status", "--threshold", bad],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out.stderr
        assert "Traceback" not in out.stderr and "--threshold" in out.stderr


def test_12_demo_bad_threshold_exits_2() -> None:
    out = subprocess.run([sys.executable, "-m", "rtml_ebpf.cli", "demo", "--threshold", "2"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr


def test_12_a_zombie_pid_is_cgroup_not_found() -> None:
    p = subprocess.Popen(["true"])
    import time

    time.sleep(0.3)  # exited, not reaped: a zombie
    try:
        with pytest.raises(CgroupNotFound, match="exited"):
            _cgroup.find_process_cgroup(p.pid)
    finally:
        p.wait()


def test_12_closed_limiter_stats_is_rtml_error() -> None:
    lim = Limiter(backend="poll", relief=False)
    lim.close()
    with pytest.raises(RtmlError, match="closed"):
        lim.stats()


def test_15_mountinfo_unescape_of_non_octal_is_kept() -> None:
    assert _cgroup._unescape("a\\999b\\040c") == "a\\999b c"


def test_hook_sets_by_name_and_bad_names_refused() -> None:
    assert config.parse_hooks("lean") == ("page_fault_user", "page_alloc", "oom_victim")
    assert config.parse_hooks("fault") == ("page_fault_user", "page_alloc", "oom_victim")
    assert config.parse_hooks("auto") is None
    assert config.parse_hooks("memcg") == ("memcg_lruvec", "memcg_state", "oom_victim")
    with pytest.raises(ConfigError, match="nope"):
        config.parse_hooks("memcg_lruvec,nope")
