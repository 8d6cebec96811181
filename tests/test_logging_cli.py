"""Logging goes to the console and to JSON lines; the tether command dispatches subcommands."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from tether.common.cli import SUBCOMMANDS
from tether.common.logging import configure_logging, get_logger


def test_json_lines_and_console(tmp_path, capsys):
    path = configure_logging("unit", run_dir=tmp_path, level="info")
    get_logger("tether.test").info("step done", step=3, reward=0.5)
    get_logger("tether.test").debug("hidden detail")
    # A third-party library logging through the standard library lands in the same files. (Not a
    # vllm.* name: once vLLM builds an engine in this process it routes its loggers to its own handler.)
    logging.getLogger("thirdparty.lib").warning("foreign %s", "library line")
    for handler in logging.getLogger().handlers:
        handler.flush()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["event"] for r in records] == ["step done", "foreign library line"]
    assert records[0]["step"] == 3 and records[0]["component"] == "unit" and records[0]["level"] == "info"
    assert "timestamp" in records[0]
    console = capsys.readouterr().err
    assert "step done" in console and "reward=0.5" in console and "hidden detail" not in console
    configure_logging("unit", run_dir=None)  # reconfiguring replaces handlers instead of stacking them
    assert sum(getattr(h, "_tether", False) for h in logging.getLogger().handlers) == 1


def test_every_subcommand_answers_help():
    for name in SUBCOMMANDS:
        result = subprocess.run([sys.executable, "-m", "tether.common.cli", name, "--help"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, (name, result.stderr)
        assert "usage" in result.stdout.lower()


def test_unknown_subcommand_fails_clearly():
    result = subprocess.run([sys.executable, "-m", "tether.common.cli", "frobnicate"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "invalid choice: 'frobnicate'" in result.stderr


def test_every_entry_point_names_a_bad_config_key_and_exits_2():
    """A typo in a key ends any daemon or command the way a bad argument does, never a traceback."""
    for module in ("tether.broker", "tether.broker.status", "tether.actor", "tether.learner", "tether.launch.demo"):
        result = subprocess.run([sys.executable, "-m", module, "learner.lrr=1"],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, (module, result.stderr[-2000:])
        assert "config error: learner.lrr: unknown config key" in result.stderr, (module, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, module


def test_exit_now_keeps_logs_and_output_but_skips_teardown(tmp_path):
    """exit_now ends a one-shot process without the interpreter's teardown (no atexit handler runs),
    yet what it logged and printed is all there, and the exit code is the one given."""
    script = (
        "import atexit\n"
        "from tether.common.logging import configure_logging, get_logger\n"
        "from tether.common.process import exit_now\n"
        f"configure_logging('unit', run_dir={str(tmp_path)!r}, level='info', console=False)\n"
        "atexit.register(print, 'teardown ran')\n"
        "get_logger('tether.test').info('report written', step=7)\n"
        "print('result line', end='')\n"  # stdout to a pipe is block-buffered: lost unless flushed
        "exit_now(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "result line"
    (log_file,) = (tmp_path / "logs").glob("*.jsonl")
    events = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert any(e["event"] == "report written" and e["step"] == 7 for e in events)


def test_environment_set_restores_what_was_there(monkeypatch):
    """The switch lasts for the block only, even when the block raises; keep_existing decides
    whether a value already set wins or is replaced for the block."""
    from tether.common.process import environment_set

    name = "TETHER_TEST_SWITCH"
    monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError), environment_set(name, "0", keep_existing=True):
        assert os.environ[name] == "0"
        raise RuntimeError("construction failed")
    assert name not in os.environ
    monkeypatch.setenv(name, "1")
    with environment_set(name, "0", keep_existing=True):
        assert os.environ[name] == "1"
    with environment_set(name, "2", keep_existing=False):
        assert os.environ[name] == "2"
    assert os.environ[name] == "1"
    with environment_set(name, None, keep_existing=False):
        assert os.environ[name] == "1"
