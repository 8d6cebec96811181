"""`tether status --wait SECONDS`: the readiness check launchers use instead of sleeping.

Asked before the broker exists, it keeps asking and succeeds once a real broker daemon answers; with
no broker it fails after the given time with a message naming the address.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from test_broker_helpers import free_port

pytestmark = pytest.mark.slow


def _status(port: int, wait: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tether.common.cli", "status", "--wait", str(wait),
                             f"broker.port={port}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_wait_succeeds_once_a_late_broker_answers(tmp_path):
    port, store = free_port(), free_port()
    waiter = _status(port, 120)
    time.sleep(3)  # the waiter is asking before anything listens
    assert waiter.poll() is None
    broker = subprocess.Popen([sys.executable, "-m", "tether.broker", f"run.dir={tmp_path}", f"broker.port={port}",
                               f"broker.store_port={store}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        out, err = waiter.communicate(timeout=120)
    finally:
        broker.terminate()
        broker.wait(timeout=30)
    assert waiter.returncode == 0, err
    assert "latest version" in out  # the status table


def test_wait_fails_with_the_address_when_no_broker_answers():
    port = free_port()
    started = time.monotonic()
    waiter = _status(port, 3)
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 1
    assert f"broker at 127.0.0.1:{port} did not answer within 3 s" in err
    assert time.monotonic() - started >= 3
