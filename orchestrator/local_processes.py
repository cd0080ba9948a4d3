"""Service processes started by launch_local: each in its own process group (so a Ctrl-C in the
terminal reaches only the launcher, which then stops them in order), stdout read for the READY
line, stderr to a log file, stopped by SIGTERM and then SIGKILL after a grace period."""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path


class ServiceStartError(RuntimeError):
    pass


class ChildService:
    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str], cwd: Path):
        self.name, self.log_path = name, log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     start_new_session=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()  # keeps the pipe drained
        self.ready_line = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_ready(self, timeout_s: float, progress=print, every_s: float = 15.0) -> list[str]:
        """Block until the READY line and return its fields; say every `every_s` that it is still
        starting (loading a large model takes a while). ServiceStartError with the log tail if the
        process exits or the timeout passes first."""
        start = time.monotonic()
        next_note = start + every_s
        while time.monotonic() - start < timeout_s:
            try:
                line = self.lines.get(timeout=1.0)
            except queue.Empty:
                if time.monotonic() >= next_note:
                    progress(f"  {self.name}: still starting ({time.monotonic() - start:.0f} s, log {self.log_path})")
                    next_note += every_s
                continue
            if line is None:
                break
            if line.startswith("READY "):
                self.ready_line = line.strip()
                return self.ready_line.split()[1:]
        code = self.proc.poll()
        why = f"exited with code {code}" if code is not None else f"not ready in {timeout_s:g} s"
        raise ServiceStartError(f"{self.name} {why}; last lines of {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def terminate(self) -> None:
        """SIGTERM the group: the service drains and exits."""
        if self._group_alive():
            os.killpg(self.proc.pid, signal.SIGTERM)

    def wait_stopped(self, deadline: float) -> int:
        """Wait for the group until `deadline` (time.monotonic), SIGKILL what is left; the exit code."""
        while self._group_alive() and time.monotonic() < deadline:
            self.proc.poll()  # reap the leader, else it lingers as a zombie in the group
            time.sleep(0.1)
        if self._group_alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
        code = self.proc.wait()
        self.log.close()
        return code


def stop_all(services: list["ChildService"], grace_s: float) -> dict[str, int]:
    """SIGTERM every service (in the given order: front ends first), give them grace_s together,
    then SIGKILL the rest. Returns each one's exit code."""
    for service in services:
        service.terminate()
    deadline = time.monotonic() + grace_s
    return {service.name: service.wait_stopped(deadline) for service in services}
