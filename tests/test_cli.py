"""``rtml-ebpf status``: JSON keys are a contract; errors have their own exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

KEYS = {"cgroup_path", "cgroup_dir", "cgroup_id", "cgroup_version", "limit_bytes", "limit_source", "usage_bytes",
        "working_set_bytes", "metric", "threshold_bytes", "headroom_bytes", "limit_headroom_bytes", "tripped",
        "backend", "backend_reason", "hooks", "oom_kills", "faults", "updated_ns", "growth_bytes_per_s",
        "seconds_to_limit", "tripped_ahead"}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rtml_ebpf.cli", *args], capture_output=True, text=True, timeout=60)


def test_status_json_has_stable_keys() -> None:
    out = cli("status", "--json", "--backend", "poll", "--threshold", "64Ki", "--metric", "usage")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert set(data) == KEYS
    assert data["backend"] == "poll" and data["threshold_bytes"] == 65536 and data["tripped"] is True


def test_status_table_names_the_backend_and_why() -> None:
    out = cli("status", "--backend", "poll")
    assert out.returncode == 0, out.stderr
    assert "backend" in out.stdout and "poll requested" in out.stdout and "effective limit" in out.stdout


def test_status_by_pid() -> None:
    out = cli("status", "--json", "--backend", "poll", "--pid", "1")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["cgroup_dir"]


def test_exit_codes_name_the_problem() -> None:
    missing = cli("status", "--cgroup", "/nonexistent")
    assert missing.returncode == 3 and "no such directory" in missing.stderr
    bad = cli("status", "--threshold", "7.5")
    assert bad.returncode == 2 and "--threshold=7.5" in bad.stderr
    both = cli("status", "--cgroup", "/x", "--pid", "1")
    assert both.returncode == 2 and "not allowed with" in both.stderr


# -- issue 21, item 12: every argument error is exit 2 with a message, never a traceback ------------
import os  # noqa: E402

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from rtml_ebpf.cli import build_parser  # noqa: E402

ODD = ["nan", "-nan", "inf", "-inf", "-1", "0", "1e400", str(10 ** 30), "", " ", "١٢", "½", "0x10", "1_0e", "é"]
# every numeric or URL option of every subcommand, with the odd values it must refuse
OPTIONS = [
    ("status", "--pid", ODD),
    ("status", "--threshold", [v for v in ODD if v not in ("١٢",)] + ["2", "7.5", "101%"]),
    ("agent", "--max-cgroups", ODD),
    ("agent", "--socket-mode", ["nan", "-1", "99", "77777", "", "é", "0o666x"]),
    ("agent", "--metrics-addr", ["nan", "127.0.0.1", ":", "host:-1", "host:99999", "[::1", "é:é"]),
    ("events", "--count", ODD),
    ("events", "--timeout", ODD),
    ("watch", "--interval", ODD),
    ("watch", "--threshold", ["nan", "inf", "-1", "0", "2", "", "é", "1e400"]),
    ("watch", "--agent", ["http://[::1", "http://[::1]:99999/metrics", "ftp://x/metrics", "", "é", "http://",
                          "nan", "http://h:port/metrics"]),
]


def refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2, (argv, err)
    assert "error: argument" in err and "Traceback" not in err, (argv, err)
    return err


@pytest.mark.parametrize("command,option,values", OPTIONS, ids=[f"{c} {o}" for c, o, _ in OPTIONS])
def test_12_odd_values_of_every_option_are_argument_errors(command: str, option: str, values: list[str],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    for value in values:
        refused([command, option, value], capsys)


@settings(max_examples=150, deadline=None)
@given(text=st.one_of(st.text(max_size=12), st.floats().map(repr), st.integers().map(str)))
def test_12_any_text_is_a_value_or_an_argument_error(text: str) -> None:
    for command, option, _ in OPTIONS:
        try:
            args = build_parser().parse_args([command, option, text])
        except SystemExit as exc:
            assert exc.code == 2
            continue
        # accepted: it is a value the command can use as it is
        value = getattr(args, option.lstrip("-").replace("-", "_"))
        if option in ("--timeout", "--interval"):
            assert 0 < value <= 86400 * 365
        elif option in ("--count", "--pid", "--max-cgroups"):
            assert value >= 1


def test_12_the_commands_of_the_issue_exit_2_with_a_message() -> None:
    for argv in (["events", "--count", "1", "--timeout", "nan"], ["watch", "--once", "--agent", "http://[::1"]):
        out = cli(*argv)
        assert out.returncode == 2 and "error: argument" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_12_a_bad_rtml_hooks_is_a_config_error_not_ebpf_skipped() -> None:
    env = {**os.environ, "RTML_HOOKS": "nonsense"}
    out = subprocess.run([sys.executable, "-m", "rtml_ebpf.cli", "status"], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode == 2 and "RTML_HOOKS='nonsense'" in out.stderr and "memcg" in out.stderr, out.stderr
    code = ("from rtml_ebpf import Limiter\ntry:\n    Limiter(backend='auto')\n"
            "except Exception as e:\n    print(repr(e))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert "ConfigError" in out.stdout and "RTML_HOOKS" in out.stdout, out.stdout + out.stderr


def test_12_status_honours_rtml_threshold() -> None:
    env = {**os.environ, "RTML_THRESHOLD": "64Ki"}
    out = subprocess.run([sys.executable, "-m", "rtml_ebpf.cli", "status", "--json", "--backend", "poll"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["threshold_bytes"] == 65536
    explicit = cli("status", "--json", "--backend", "poll", "--threshold", "128Ki")
    assert json.loads(explicit.stdout)["threshold_bytes"] == 131072  # the option wins over the variable


@pytest.mark.parametrize("given_", ["1", "2", "50", "100", "4095"])
def test_12_the_suggested_threshold_is_accepted(given_: str) -> None:
    import re

    from rtml_ebpf.config import parse_threshold_text

    out = cli("status", "--threshold", given_)
    assert out.returncode == 2, out.stderr
    suggested = re.findall(r"pass (\S+) for", out.stderr)
    assert suggested, out.stderr
    for value in suggested:
        parse_threshold_text(value)  # raises if a suggestion is refused too
