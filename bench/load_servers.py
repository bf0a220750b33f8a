"""bench.load's machine and servers: the machine's facts and load, CPU seconds of a server's processes, one
deployment's settings and database (:class:`Mode`, which starts ``hipp serve`` on 127.0.0.1), and which
processes are left after a stop."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from worker.cli.serve import wait_ready

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"  # load goes to this machine only


def machine() -> dict[str, Any]:
    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
    }


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a server and its processes (the API processes under ``--api-processes``)."""
    import psutil

    total = 0.0
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = proc.cpu_times()
            total += t.user + t.system
    return total


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Mode:
    """One deployment's settings (as HIPP_* variables) and its database, created here and dropped at the end."""

    def __init__(
        self, name: str, pg_url: str, redis_url: str, api_threads: int | None = None, api_processes: int = 1
    ) -> None:
        self.name = name
        self.home = Path(tempfile.mkdtemp(prefix=f"hipp-load-{name}-"))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("HIPP_")}
        self.env.update(
            HIPP_HOME=str(self.home),
            HIPP_SIGNING_SECRET="bench-load",
            HIPP_MAX_ACTIVE_JOBS_PER_TENANT="0",  # the bench submits far more than the per-tenant quota
            HIPP_RATE_LIMIT_PER_MINUTE="0",  # and faster than the per-tenant rate limit
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
        )
        if api_threads:
            self.env["HIPP_API_THREADS"] = str(api_threads)
        self.api_processes = api_processes
        self.db_name: str | None = None
        self.pg_admin = pg_url
        self.redis_url = redis_url
        if name == "postgres":
            from sqlalchemy import create_engine, make_url, text

            self.db_name = f"hipp_load_{uuid.uuid4().hex[:8]}"
            admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as c:
                c.execute(text(f'CREATE DATABASE "{self.db_name}"'))
            admin.dispose()
            self.db_url = make_url(pg_url).set(database=self.db_name).render_as_string(hide_password=False)
            tag = self.db_name
            self.env.update(
                HIPP_DATABASE_URL=self.db_url,
                HIPP_BROKER_URL=redis_url,
                HIPP_GPU_QUEUE=f"gpu-{tag}",
                HIPP_DEFAULT_QUEUE=f"default-{tag}",
            )
        else:
            self.db_url = f"sqlite:///{self.home / 'hipp.db'}"
        from app.db import session_scope
        from app.migrate import upgrade
        from app.security import create_api_key

        upgrade(self.db_url)
        with session_scope(self.db_url) as s:
            self.key, _ = create_api_key(s, "bench-load")

    def serve(self, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
        extra = (*extra, "--api-processes", str(self.api_processes))
        port = free_port()
        url = f"http://{HOST}:{port}"
        env = dict(self.env, HIPP_PUBLIC_URL=url)
        log = (self.home / "serve.log").open("ab")
        cmd = [sys.executable, "-m", "worker.cli.serve", "serve", "--host", HOST, "--port", str(port), *extra]
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=log)
        log.close()
        wait_ready(url, proc, timeout=90)
        return proc, url

    def cleanup(self) -> None:
        import shutil

        from app.db import dispose_all

        dispose_all()
        shutil.rmtree(self.home, ignore_errors=True)
        if self.db_name:
            import redis
            from sqlalchemy import create_engine, text

            r = redis.Redis.from_url(self.redis_url)
            for key in r.scan_iter(match=f"*{self.db_name}*"):
                r.delete(key)
            admin = create_engine(self.pg_admin, isolation_level="AUTOCOMMIT")
            with admin.connect() as c:
                c.execute(text(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)'))
            admin.dispose()


def descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def alive(pids: list[int]) -> list[int]:
    import psutil

    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out
