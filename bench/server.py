"""Start, watch, measure and stop one server process for a benchmark run."""

import asyncio
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx

REPO = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
T = TypeVar("T")


class ServerDied(RuntimeError):
    """The server process exited while it was being measured."""


@dataclass
class ServerSpec:
    """What to run: an ASGI app path and the environment it needs."""

    name: str
    app: str
    env: dict[str, str] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's open-file limit towards `wanted`; return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    except (ValueError, OSError):  # not root: stay under the hard limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Server:
    """A uvicorn process serving one app on 127.0.0.1, optionally pinned to a CPU."""

    def __init__(self, spec: ServerSpec, cpu: int | None, fd_limit: int) -> None:
        self.spec = spec
        self.cpu = cpu
        self.fd_limit = fd_limit
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stderr = tempfile.NamedTemporaryFile(prefix=f"bench-{spec.name}-", suffix=".log")
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        # --log-level warning: uvicorn logs three lines per WebSocket at info level,
        # which would make the benchmark measure the logger.
        return [sys.executable, "-m", "uvicorn", self.spec.app,
                "--host", "127.0.0.1", "--port", str(self.port),
                "--ws-max-size", "65536", "--ws-per-message-deflate", "false",
                "--log-level", "warning"]

    def prepare_child(self) -> None:
        """Runs in the child before exec: CPU pinning and the fd limit (`ulimit -n`)."""
        if self.cpu is not None:
            os.sched_setaffinity(0, {self.cpu})
        raise_fd_limit(self.fd_limit)

    def start(self, ready_timeout: float = 30.0) -> None:
        env = {**os.environ, **self.spec.env}
        self.process = subprocess.Popen(
            self.command(), cwd=REPO, env=env, stdin=subprocess.DEVNULL,
            stdout=self.stderr, stderr=subprocess.STDOUT,
            preexec_fn=self.prepare_child, start_new_session=True)
        self.wait_ready(ready_timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if httpx.get(self.url + "/healthz", timeout=2, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise ServerDied(f"{self.spec.name} did not answer /healthz with 200 within {timeout:.0f} s"
                         f"\n{self.log_tail()}")

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise ServerDied(f"{self.spec.name} exited with code {self.process.returncode}"
                             f"\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        self.stderr.flush()
        text = Path(self.stderr.name).read_text(errors="replace").splitlines()
        tail = "\n".join("    " + line for line in text[-lines:])
        return f"  last lines of its output:\n{tail}" if tail else "  (it printed nothing)"

    def cpu_seconds(self) -> float:
        """User plus system CPU time of the server process (all its threads)."""
        stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)"; utime, stime are fields 14, 15
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise ServerDied(f"{self.spec.name}: no VmRSS in /proc/{self.process.pid}/status")

    async def watch(self, work: Awaitable[T]) -> T:
        """Await `work`, but stop at once with ServerDied if the server exits meanwhile."""
        task = asyncio.ensure_future(work)
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if self.process.poll() is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                self.check_alive()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def close(self) -> None:
        self.stop()
        self.stderr.close()
