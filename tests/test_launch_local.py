"""Smoke test of the main-job command with tiny models: `python -m orchestrator.launch_local` starts
the three services, prints where to connect and a sample with its speed, and stops exactly the
processes it started, after the sample or on Ctrl-C."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.service_process import REPO, child_env

TINY = ["--dtype", "float32", "--target-factory", "tests.service_models:target", "--draft-factory", "tests.service_models:draft",
        "--tokenizer-factory", "tests.char_tokenizer:char_tokenizer", "--max-new-tokens", "24", "--grace-s", "10"]
pytestmark = pytest.mark.e2e


def launch(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator.launch_local", *TINY, *args], cwd=REPO,
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def stop(launcher: subprocess.Popen) -> None:
    """After a failure: SIGTERM lets the launcher stop its services; SIGKILL if it does not."""
    if launcher.poll() is None:
        launcher.terminate()
        try:
            launcher.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()


def gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)  # each service ran in its own process group, led by the pid printed
        return False
    except ProcessLookupError:
        return True


def check_children_gone(output: str) -> None:
    pids = [int(p) for p in re.findall(r"starting \(pid (\d+)", output)]
    assert len(pids) == 3, output
    deadline = time.monotonic() + 5
    while not all(gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(gone(pid) for pid in pids), f"left running: {[p for p in pids if not gone(p)]}"
    assert re.search(r"stopped: orchestrator exit 0, worker exit 0, target exit 0", output), output


def test_launch_local_prints_endpoints_and_a_sample_then_exits_cleanly():
    launcher = launch("--exit-after-sample", "--compare")
    try:
        output, _ = launcher.communicate(timeout=240)
    finally:
        stop(launcher)
    assert launcher.returncode == 0, output
    grpc_address = re.search(r"gRPC\s+dyspec\.v1\.Generation\s+(\S+)", output).group(1)
    http = re.search(r"HTTP\s+OpenAI-compatible\s+(http://\S+)/v1", output).group(1)
    assert f"curl -s {http}/v1/completions" in output and f"OpenAI(base_url='{http}/v1'" in output
    assert f"Client('{grpc_address}')" in output
    assert re.search(r"24 tokens in [\d.]+ s \(length\): [\d.]+ tokens/s", output), output
    assert re.search(r"[\d.]+ tokens/step over \d+ target forwards; accepted \d+ of \d+ drafted nodes", output)
    assert re.search(r"speculative speedup [\d.]+x, identical output", output), output
    check_children_gone(output)


def test_ctrl_c_stops_what_the_launcher_started():
    launcher = launch()
    lines = []
    try:
        for line in launcher.stdout:
            lines.append(line)
            if "press Ctrl-C" in line:
                break
        assert any("press Ctrl-C" in line for line in lines), "".join(lines)
        launcher.send_signal(signal.SIGINT)
        rest, _ = launcher.communicate(timeout=60)
    finally:
        stop(launcher)
    output = "".join(lines) + rest
    assert launcher.returncode == 130, output
    check_children_gone(output)
