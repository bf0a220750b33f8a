"""Fixtures for the service tests: a real Postgres database (created and dropped here), Redis, and an S3
server (moto's threaded server on a free port). Nothing is mocked.

Each session uses its own database and its own queue names, so runs in parallel on one server don't collide;
each test gets its own tenant, so tests don't see each other's jobs.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, make_url, text

from app.config import Settings
from app.db import dispose_all, session_scope
from app.migrate import upgrade
from app.security import create_api_key

PG_URL = os.environ.get("HIPP_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("HIPP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _admin_engine():  # type: ignore[no-untyped-def]
    return create_engine(PG_URL, isolation_level="AUTOCOMMIT")


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    name = f"hipp_test_{uuid.uuid4().hex[:10]}"
    admin = _admin_engine()
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # pragma: no cover - only without a server
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}: {exc}")
    url = make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    yield url
    dispose_all()
    with admin.connect() as conn:
        kill = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"
        conn.execute(text(kill + " AND pid <> pg_backend_pid()"), {"n": name})
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping()
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"Redis not reachable at {REDIS_URL}: {exc}")
    return REDIS_URL


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def session_tag(redis_url: str) -> Iterator[str]:
    import redis

    tag = uuid.uuid4().hex[:8]
    yield tag
    r = redis.Redis.from_url(redis_url)
    for key in r.scan_iter(match=f"*{tag}*"):
        r.delete(key)


@pytest.fixture(scope="session")
def stack_settings(
    pg_url: str, redis_url: str, s3_endpoint: str, session_tag: str, tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    """Full-stack settings: Postgres, Redis, S3 (moto). Queue names are unique to this test session."""
    home: Path = tmp_path_factory.mktemp("hipp-home")
    return Settings(
        home=home,
        database_url=pg_url,
        broker_url=redis_url,
        gpu_queue=f"gpu-{session_tag}",
        default_queue=f"default-{session_tag}",
        storage="s3",
        s3_bucket=f"hipp-test-{session_tag}",
        s3_endpoint_url=s3_endpoint,
        s3_access_key_id="testing",
        s3_secret_access_key="testing",
        s3_create_bucket=True,
        signing_secret="test-secret",
        heartbeat_s=1.0,
    )


def in_process_settings(stack_settings: Settings, home: Path, tag: str) -> Settings:
    """Full-stack settings for tests that run their jobs in-process: one attempt, and a GPU queue of their own
    that no worker consumes."""
    return stack_settings.model_copy(
        update={"max_attempts": 1, "gpu_queue": f"{stack_settings.gpu_queue}-{tag}", "home": home}
    )


@contextlib.contextmanager
def app_client(settings: Settings) -> Iterator[Any]:
    """A TestClient of the API built for ``settings`` (its lifespan runs)."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(settings)) as c:
        yield c


def stack_env(settings: Settings) -> dict[str, str]:
    """The same settings as HIPP_* environment variables, for worker subprocesses."""
    env = dict(os.environ)
    for field, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        env[f"HIPP_{field.upper()}"] = str(value)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


@pytest.fixture
def tenant_key(stack_settings: Settings) -> str:
    """A new tenant with one API key, per test."""
    with session_scope(stack_settings.resolved_database_url) as session:
        key, _ = create_api_key(session, f"tenant-{uuid.uuid4().hex[:8]}", "test")
    return key


@pytest.fixture
def client(stack_settings: Settings):  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(stack_settings)) as c:
        yield c


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
