"""Fixtures that start real servers on free loopback ports: MongoDB (or nx-27017) and Redis.

A server the tests need and cannot start is a failure, never a skip. Every process is
started in its own process group and killed at the end of the session, also when a test
fails or the run is interrupted.

MongoDB: if `PTUTILS_TEST_MONGO_URI` is set, that server is used (and must answer a ping);
otherwise an `nx-27017` (a MongoDB wire-protocol server on SQLite) from the virtualenv is
started with a file-backed data directory. Tests that kill the server (`mongo_process`)
always start a private nx-27017, since an external server cannot be killed.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

__all__ = [
    "MongoProcess",
    "RabbitProcess",
    "RedisProcess",
    "ServerProcess",
    "each_store",
    "free_port",
    "mongo_process",
    "mongo_server",
    "mongo_store",
    "mongo_uri",
    "rabbit_server",
    "redis_process",
    "redis_server",
    "redis_url",
    "uri_with_db",
]

START_TIMEOUT = 30.0
"""Seconds a server may take to answer its first ping."""

_LIVE: set[ServerProcess] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pdeathsig() -> Callable[[], object] | None:
    """prctl(PR_SET_PDEATHSIG, SIGKILL), looked up once in the parent (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(1, int(signal.SIGKILL), 0, 0, 0)


_DIE_WITH_PARENT = _pdeathsig()
"""Run in the forked child: it gets SIGKILL when pytest dies, even by SIGKILL."""


def uri_with_db(uri: str, db: str) -> str:
    """`uri` pointing at database `db`, keeping options (and the auth database)."""
    parts = urlsplit(uri)
    query = parts.query
    old_db = parts.path.strip("/")
    if "@" in parts.netloc and "authsource=" not in query.lower():
        query = "&".join(q for q in (query, f"authSource={old_db or 'admin'}") if q)
    return urlunsplit((parts.scheme, parts.netloc, "/" + db, query, ""))


class ServerProcess:
    """A server process on a fixed loopback port with its data in `workdir`.

    `start()` waits until `ready()` is true; `kill()` sends SIGKILL to the process group;
    `restart()` starts it again on the same port with the same data.
    """

    name = "server"

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log_path = self.workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> ServerProcess:
        """Spawn the server and wait until it answers; fail with its log otherwise."""
        if self.alive:
            return self
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(), cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_DIE_WITH_PARENT,
            )
        _LIVE.add(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                self._fail(f"exited with code {self.proc.returncode}")
            if self.ready():
                return self
            time.sleep(0.1)
        self.kill()
        self._fail(f"did not answer within {timeout:.0f}s")
        raise AssertionError("unreachable")

    def _fail(self, why: str) -> None:
        tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
        pytest.fail(f"{self.name} on port {self.port} {why}; log {self.log_path}:\n{tail}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to the whole process group and reap the process."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        _LIVE.discard(self)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.alive:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def restart(self, timeout: float = START_TIMEOUT) -> ServerProcess:
        """Kill (SIGKILL) if running, then start again on the same port and data."""
        self.kill()
        return self.start(timeout)


def nx_27017_path() -> str:
    """The `nx-27017` console script of the running virtualenv."""
    path = Path(sys.executable).parent / "nx-27017"
    if path.exists():
        return str(path)
    found = shutil.which("nx-27017")
    if not found:
        pytest.fail("nx-27017 not found next to the interpreter: run `make install` "
                    "(or `pip install nx-27017`), or set PTUTILS_TEST_MONGO_URI")
    return found


class MongoProcess(ServerProcess):
    """An nx-27017 server whose databases live as SQLite files in `workdir/data`."""

    name = "nx-27017"

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        return [
            nx_27017_path(), "--host", "127.0.0.1", "-p", str(self.port),
            "--data-dir", str(self.workdir / "data"),
            "--log-file", str(self.workdir / "nx.log"),
            "--pid-file", str(self.workdir / "nx.pid"),
        ]

    def ready(self) -> bool:
        return mongo_ping(self.uri, timeout_ms=500) is None


class ExternalMongo:
    """A MongoDB given by `PTUTILS_TEST_MONGO_URI`: used as is, never started or killed."""

    def __init__(self, uri: str) -> None:
        self.uri = uri


def mongo_ping(uri: str, timeout_ms: int = 3000) -> str | None:
    """None if the server at `uri` answers a ping, else the error text."""
    import pymongo

    client = pymongo.MongoClient(
        uri, serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms
    )
    try:
        client.admin.command("ping")
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
        return f"{type(exc).__name__}: {exc}"
    finally:
        client.close()


REDIS_DATABASES = 64
"""Databases of a test redis-server: tests take one each (tests/test_workers.py
redis_db) and come round again only after 63 others."""


class RedisProcess(ServerProcess):
    """A `redis-server` without persistence: a restart comes back with an empty dataset."""

    name = "redis-server"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server not found on PATH: install it with "
                        "`apt-get install redis-server`")
        return [
            binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
            "--daemonize", "no", "--databases", str(REDIS_DATABASES),
        ]

    def ready(self) -> bool:
        import redis

        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()


class RabbitProcess(ServerProcess):
    """A private `rabbitmq-server` node (no plugins) whose delivery acknowledgement
    timeout is `consumer_timeout_ms`, checked every `tick_ms`: a short one, without
    touching any other RabbitMQ on the machine. Takes 10-20 s to start."""

    name = "rabbitmq-server"

    def __init__(self, workdir: Path, port: int | None = None, *,
                 consumer_timeout_ms: int = 2000, tick_ms: int = 200) -> None:
        super().__init__(workdir, port)
        self.dist_port = free_port()
        self.consumer_timeout_ms = consumer_timeout_ms
        self.tick_ms = tick_ms

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def argv(self) -> list[str]:
        binary = rabbitmq_server_path()
        (self.workdir / "enabled_plugins").write_text("[].\n")
        (self.workdir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n")
        (self.workdir / "advanced.config").write_text(
            f"[{{rabbit, [{{consumer_timeout, {self.consumer_timeout_ms}}}, "
            f"{{channel_tick_interval, {self.tick_ms}}}]}}].\n")
        env = {
            "HOME": str(self.workdir),
            "RABBITMQ_NODENAME": f"ptutils-test-{self.port}@localhost",
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.workdir / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.workdir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.workdir / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.workdir / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.workdir / "rabbitmq.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }
        return ["env", *(f"{k}={v}" for k, v in env.items()), binary]

    def ready(self) -> bool:
        from kombu import Connection

        try:
            with Connection(self.url, connect_timeout=0.5) as conn:
                conn.ensure_connection(max_retries=1, timeout=0.5)
            return True
        except Exception:  # noqa: BLE001 - not listening yet
            return False


def rabbitmq_server_path() -> str:
    """The `rabbitmq-server` start script (the Debian wrapper in /usr/sbin switches user)."""
    for path in ("/usr/lib/rabbitmq/bin/rabbitmq-server", shutil.which("rabbitmq-server")):
        if path and os.path.exists(path):
            return path
    pytest.fail("rabbitmq-server is not installed: `apt-get install rabbitmq-server` "
                "(.ci/run does), or point PTUTILS_TEST_AMQP_URL at a RabbitMQ")
    raise AssertionError("unreachable")


@atexit.register
def _kill_leftovers() -> None:
    """Last resort when pytest is interrupted before the finalizers run."""
    for server in list(_LIVE):
        server.kill()


def _factory(
    cls: type[ServerProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[], ServerProcess]]:
    started: list[ServerProcess] = []

    def make() -> ServerProcess:
        server = cls(tmp_path_factory.mktemp(cls.name))
        started.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in started:
            server.kill()


# --- MongoDB ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def mongo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The MongoDB of this test session: `PTUTILS_TEST_MONGO_URI`, or a fresh nx-27017."""
    external = os.environ.get("PTUTILS_TEST_MONGO_URI")
    if external:
        error = mongo_ping(external)
        if error is not None:
            pytest.fail(f"PTUTILS_TEST_MONGO_URI does not answer a ping: {error}")
        yield ExternalMongo(external)
        return
    server = MongoProcess(tmp_path_factory.mktemp("mongo"))
    try:
        yield server.start()
    finally:
        server.kill()


@pytest.fixture
def mongo_process(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[], MongoProcess]]:
    """Factory of private, killable nx-27017 servers (file-backed), for fault tests."""
    yield from _factory(MongoProcess, tmp_path_factory)  # type: ignore[misc]


@pytest.fixture
def mongo_uri(mongo_server: object) -> Iterator[str]:
    """A URI to an empty database of its own; the database is dropped afterwards."""
    import pymongo

    if isinstance(mongo_server, MongoProcess) and not mongo_server.alive:
        mongo_server.start()  # an earlier test killed it
    name = f"t_{uuid.uuid4().hex[:12]}"
    uri = uri_with_db(mongo_server.uri, name)  # type: ignore[attr-defined]
    yield uri
    client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=3000)
    try:
        client.drop_database(name)
    except pymongo.errors.PyMongoError:
        pass  # a test that killed the server; the data dir goes with the tmp dir
    finally:
        client.close()


@pytest.fixture
def mongo_store(mongo_uri: str) -> Iterator[object]:
    """A `MongoStore` on an empty database of its own, closed afterwards."""
    from ptutils.store.mongo import MongoStore

    store = MongoStore(mongo_uri, retry_seconds=10.0)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture(params=["local", "mongo"])
def each_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[object]:
    """An empty store of each backend: a LocalStore folder, then `mongo_store`."""
    if request.param == "mongo":
        yield request.getfixturevalue("mongo_store")
        return
    from ptutils.store.local import LocalStore

    local = LocalStore(tmp_path / "store")
    try:
        yield local
    finally:
        local.close()


# --- Redis -----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A redis-server for this test session; `.kill()` / `.restart()` (comes back empty)."""
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    try:
        yield server.start()  # type: ignore[misc]
    finally:
        server.kill()


@pytest.fixture
def redis_process(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[], RedisProcess]]:
    """Factory of private redis-servers, for tests that kill the broker."""
    yield from _factory(RedisProcess, tmp_path_factory)  # type: ignore[misc]


@pytest.fixture(scope="session")
def rabbit_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitProcess]:
    """A private RabbitMQ whose consumer_timeout is 2 s (checked every 0.2 s)."""
    server = RabbitProcess(tmp_path_factory.mktemp("rabbitmq"))
    try:
        yield server.start(timeout=90)  # type: ignore[misc]
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisProcess) -> str:
    """The session's redis URL, with its database flushed (restarted if a test killed it)."""
    import redis

    if not redis_server.alive:
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushdb()
    finally:
        client.close()
    return redis_server.url
