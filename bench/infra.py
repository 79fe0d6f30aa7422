"""Processes, ports, databases and folders the benchmark makes -- and always removes.

Every resource is registered on a ``contextlib.ExitStack`` the moment it exists,
so an exception or Ctrl-C (SIGTERM is turned into the same ``KeyboardInterrupt``)
unwinds them all: servers are stopped by process group (uvicorn's workers
included), PostgreSQL databases are dropped ``WITH (FORCE)`` and temporary
folders deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import asyncpg
import httpx

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
PG_ADMIN_DSN = os.environ.get("BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


def free_port() -> int:
    """A port the kernel just handed out on loopback (tiny race, fine for a benchmark)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def sigterm_as_interrupt() -> None:
    """Let SIGTERM unwind the ExitStack like Ctrl-C does."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the benchmark itself is killed outright."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The caller's environment without any BROKER_* (the broker refuses unknown ones)."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BROKER_")}
    env.update(extra)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --------------------------------------------------------------------------- servers


@dataclass
class Server:
    """A server started in its own session, so its whole process group can be stopped."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def worker_pids(self) -> list[int]:
        """uvicorn serves in the main process with one worker, in children with several."""
        children = _children(self.proc.pid)
        return children or [self.proc.pid]

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 (after the parenthesised command, which may hold spaces) is the ppid.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


def start_server(
    stack: contextlib.ExitStack,
    name: str,
    argv: list[str],
    *,
    env: Mapping[str, str],
    port: int,
    log_dir: Path,
    ready_path: str,
    timeout: float = 60.0,
) -> Server:
    """Start ``argv``, register its stop on ``stack``, return once ``ready_path`` answers 200."""
    log_path = log_dir / f"{name}.log"
    log = log_path.open("wb")
    stack.callback(log.close)
    proc = subprocess.Popen(
        argv,
        env=dict(env),
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_die_with_parent,  # the benchmark runs no threads while starting servers
    )
    server = Server(name, proc, port, log_path)
    stack.callback(server.stop)
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{server.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(server.url + ready_path).status_code == 200:
                    return server
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not become ready:\n{server.log_tail()}")
            time.sleep(0.1)


def uvicorn_argv(app: str, port: int, workers: int) -> list[str]:
    return [
        str(VENV_BIN / "uvicorn"),
        app,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--log-level",
        "warning",
        "--no-access-log",
    ]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU the processes have used so far, from /proc/PID/stat."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / os.sysconf("SC_CLK_TCK")


def database_cpu_seconds() -> float | None:
    """CPU used so far by this machine's PostgreSQL processes, or None if none run here.

    Every process named ``postgres`` counts (backends, WAL writer, checkpointer): the
    bench's server is the local one, and nothing else is meant to load it meanwhile.
    """
    total, found = 0, False
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "postgres":
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        found = True
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK") if found else None


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of all cores so far, from /proc/stat's ``cpu`` line.

    Idle and I/O wait are not busy; steal (time the hypervisor gave elsewhere) is.
    """
    line = Path("/proc/stat").read_text().split("\n", 1)[0]
    # user nice system idle iowait irq softirq steal; guest time is already in user.
    values = [int(v) for v in line.split()[1:9]]
    idle = values[3] + values[4]
    ticks = os.sysconf("SC_CLK_TCK")
    return (sum(values) - idle) / ticks, sum(values) / ticks


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmHWM, VmRSS) of a process in MB (10**6 bytes, as the target), from /proc/PID/status."""
    values = {"VmHWM": 0.0, "VmRSS": 0.0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in values:
            values[key] = int(rest.split()[0]) * 1024 / 1e6
    return values["VmHWM"], values["VmRSS"]


# --------------------------------------------------------------------------- databases


def pg_url(dbname: str) -> str:
    """The broker's URL for a benchmark database: TCP on 127.0.0.1 unless
    ``BENCH_PG_SOCKET`` names the server's Unix-socket folder (a co-located database)."""
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    socket = os.environ.get("BENCH_PG_SOCKET")
    # A ``host`` query parameter overrides the DSN's host; user and port stay the DSN's.
    return f"{base}/{dbname}?host={socket}" if socket else f"{base}/{dbname}"


def pg_dsn(dbname: str) -> str:
    """Plain asyncpg DSN of a database on the benchmark's server."""
    return PG_ADMIN_DSN.rsplit("/", 1)[0] + f"/{dbname}"


async def _pg_admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def pg_version() -> str:
    async def query() -> str:
        conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=10)
        try:
            return str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()

    try:
        return asyncio.run(query())
    except (OSError, asyncpg.PostgresError) as exc:
        return f"unreachable ({type(exc).__name__})"


def postgres_database(stack: contextlib.ExitStack, purpose: str) -> str:
    """Create ``bench_<purpose>_<random>``, dropped when ``stack`` unwinds; returns its name."""
    name = f"bench_{purpose}_{uuid.uuid4().hex[:8]}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    stack.callback(lambda: asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')))
    return name


async def settle_postgres(dbname: str) -> None:
    """Statistics current, dead rows gone and dirty pages flushed before measuring."""
    conn = await asyncpg.connect(pg_dsn(dbname), timeout=10)
    try:
        await conn.execute("VACUUM (ANALYZE)")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


def temp_dir(stack: contextlib.ExitStack, purpose: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=f"bench-{purpose}-"))
    stack.callback(shutil.rmtree, path, ignore_errors=True)
    return path


def migrate(database_url: str, log_dir: Path) -> None:
    """``broker migrate`` as the operator runs it."""
    env = clean_env({"BROKER_DATABASE_URL": database_url, "BROKER_ENVIRONMENT": "dev"})
    out = subprocess.run(
        [str(VENV_BIN / "broker"), "migrate"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    (log_dir / "migrate.log").write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        raise RuntimeError(f"broker migrate failed:\n{out.stderr[-2000:]}")
