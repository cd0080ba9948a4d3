"""Service processes for tests: started with `python -m <module> --port 0`, ready when they print
`READY host:port`, stopped by SIGTERM to their own process group (then SIGKILL if they linger)."""
from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    # One BLAS thread per process: several processes share two cores. DS_ACCELERATOR=cpu keeps
    # DeepSpeed from probing for a GPU.
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


class ServiceProcess:
    def __init__(self, argv: list[str], log_path: Path):
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(argv, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, start_new_session=True)
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()  # keeps the pipe drained
        self.address = ""
        self.ready_line = ""  # the whole READY line (the orchestrator adds its HTTP URL)

    @classmethod
    def module(cls, module: str, args: list[str], log_path: Path) -> "ServiceProcess":
        return cls([sys.executable, "-m", module, "--host", "127.0.0.1", "--port", "0", *args], log_path)

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def wait_ready(self, timeout: float) -> str:
        """Block until the READY line; returns host:port. Fails with the log tail otherwise."""
        try:
            while True:
                line = self._lines.get(timeout=timeout)
                if line is None:
                    break
                if line.startswith("READY "):
                    self.ready_line = line.strip()
                    self.address = line.split()[1]
                    return self.address
        except queue.Empty:
            pass
        self.stop()
        raise RuntimeError(f"{self.proc.args} not ready (rc={self.proc.poll()}); log tail:\n"
                           + self.log_path.read_text()[-3000:])

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except ProcessLookupError:
            return False

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM the group (the service drains), SIGKILL what is left after `timeout`; returns the
        exit code. Waits for the whole group: a launcher may exit before the ranks it started."""
        if self._group_alive():
            self.signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            self.signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self._group_alive() and time.monotonic() < deadline:
                self.proc.poll()  # reap the leader, else it lingers as a zombie in the group
                time.sleep(0.1)
            if self._group_alive():
                self.signal(signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()
        return self.proc.returncode
