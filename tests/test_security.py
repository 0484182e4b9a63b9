"""The operator decides what code a config may load (ptutils.policy), on real workers.

Two `ptutils worker`s share the module, each with its own broker database and store
so that nothing of one reaches the other: `strict` runs with no allowance at all,
`lenient` with `--trust-session-code --allow-imports mylab_models`. Both see, on
their PYTHONPATH, a site folder with two installed packages: `eplab`, which declares
its module under the `ptutils.modules` entry point group, and `mylab_models`, which
does not. Every refusal is checked with a marker file that the refused code would
have written.
"""

from __future__ import annotations

import itertools
import os
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.submit import Prepared, prepare, submit
from ptutils import policy
from ptutils.errors import ConfigError, RegistryError
from ptutils.policy import Policy
from ptutils.runner import load_experiment, validate
from ptutils.store.mongo import MongoStore
from tests.helpers import digits_config
from tests.servers import uri_with_db
from tests.test_workers import ROOT, Worker, _drop, ptutils, wait_for
from workers.app import make_app

MARKERS_ENV = "PTUTILS_TEST_SECURITY_MARKERS"
_names = itertools.count()

NET = """
    import torch


    class Net(torch.nn.Module):
        def __init__(self, width: int = 16) -> None:
            super().__init__()
            self.fc1 = torch.nn.Linear(64, width)
            self.fc2 = torch.nn.Linear(width, 10)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))
"""

SESSION_FILE = f"""
    import os
    from pathlib import Path

    if os.environ.get("{MARKERS_ENV}"):  # set on the workers only: proves the file ran there
        Path(os.environ["{MARKERS_ENV}"], f"imported-{{os.getpid()}}").write_text("imported")
""" + NET


# --- configs -------------------------------------------------------------------------
def small(network: dict[str, Any], imports: list[Any] | None = None) -> dict[str, Any]:
    """A digits session of two 10-step chunks, with `network` as its network."""
    cfg = digits_config(imports=imports or [], callbacks=[], total_steps=20, chunk_steps=10,
                        eval_every=0)
    cfg["model"]["network"] = network
    if not imports:
        del cfg["imports"]
    return cfg


def write(folder: Path, cfg: dict[str, Any], name: str = "exp.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def session_file(folder: Path, width: int = 16, name: str = "my_modules") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(SESSION_FILE).replace("width: int = 16", f"width: int = {width}"))
    return path


def hostile(marker: Path) -> dict[str, dict[str, Any]]:
    """Configs that would write `marker`-prefixed files if anything they name were built."""
    popen = {"type": "psutil.Popen", "args": ["touch", f"{marker}-popen"]}
    memmap = {"type": "numpy.memmap", "filename": f"{marker}-memmap", "mode": "w+",
              "shape": [16]}
    return {
        "psutil imported": small(popen, imports=["psutil"]),
        "psutil named": small(popen),
        "numpy imported": small(memmap, imports=["numpy"]),
        "numpy named": small(memmap),
        "ptutils store": small({"type": "ptutils.store.local.LocalStore",
                                "root": f"{marker}-store"}),
    }


# --- fixtures: the site, brokers, stores, workers -----------------------------------
@pytest.fixture(autouse=True)
def _strict_policy() -> Iterator[None]:
    """This test process (the submitter) allows nothing unless a test says so."""
    previous = policy.configure(Policy())
    yield
    policy.configure(previous)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Installed packages: `eplab` declares `eplab.nets` as ptutils modules, `mylab_models`
    declares nothing. On this process's sys.path too (the submitter has them)."""
    root = tmp_path_factory.mktemp("site")
    for package, files in {"eplab": {"__init__.py": "", "nets.py": NET},
                           "mylab_models": {"__init__.py": NET}}.items():
        (root / package).mkdir()
        for name, body in files.items():
            (root / package / name).write_text(textwrap.dedent(body))
    info = root / "eplab-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: eplab\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[ptutils.modules]\nnets = eplab.nets\n")
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))


class Cluster:
    """A worker with its own broker database and store."""

    def __init__(self, worker: Worker, broker: str, store_uri: str, markers: Path) -> None:
        self.worker, self.broker, self.store_uri, self.markers = worker, broker, store_uri, markers
        self.store = MongoStore(store_uri)

    def submit(self, prepared: list[Prepared]) -> list[str]:
        return [s.session for s in submit(self.store, make_app(self.broker), prepared)]

    def force(self, cfg: dict[str, Any]) -> str:
        """Store and queue `cfg` as is, as if `submit`'s checks had been bypassed."""
        (sid,) = self.submit([Prepared(f"forced-{next(_names)}", cfg, [], 20, 1)])
        return sid

    def finished(self, sid: str, timeout: float = 60) -> dict[str, Any]:
        """The session once completed (with its final Eval) or failed."""

        def done() -> dict[str, Any] | None:
            doc = self.store.get_session(sid)
            if doc["status"] == "failed":
                return doc
            final = self.store.query_statistics(sid, phase="eval", step_min=20)
            return doc if doc["status"] == "completed" and final else None

        try:
            return wait_for(done, timeout, f"session {sid} to finish", alive=self.worker)
        except AssertionError:
            print(f"--- {self.worker.name} log ---\n{self.worker.log[-6000:]}")
            raise


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, redis_server: Any, mongo_server: Any,
            site: Path) -> Iterator[Callable[..., Cluster]]:
    """Factory of module-wide clusters, stopped (and their stores dropped) at the end."""
    import redis

    made: list[Cluster] = []
    dbs = iter(range(14, 16))

    def make(name: str, *args: str, env: dict[str, str] | None = None) -> Cluster:
        if not redis_server.alive:
            redis_server.start()
        broker = f"redis://127.0.0.1:{redis_server.port}/{next(dbs)}"
        client = redis.Redis.from_url(broker)
        client.flushdb()
        client.close()
        store_uri = uri_with_db(mongo_server.uri, f"sec_{uuid.uuid4().hex[:10]}")
        folder = tmp_path_factory.mktemp(name)
        markers = folder / "markers"
        markers.mkdir()
        worker = Worker(name, broker, store_uri, folder, *args, env={
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(site)]),
            "PTUTILS_TRUST_SESSION_CODE": "0", "PTUTILS_ALLOW_IMPORTS": "",
            MARKERS_ENV: str(markers), **(env or {})})
        made.append(Cluster(worker, broker, store_uri, markers))
        return made[-1]

    yield make
    for c in made:
        c.worker.stop()
        c.store.close()
        _drop(c.store_uri)


@pytest.fixture(scope="module")
def strict(cluster: Callable[..., Cluster]) -> Cluster:
    """A worker started with no allowance (and none in its environment)."""
    c = cluster("strict")
    c.worker.wait_ready()
    return c


@pytest.fixture(scope="module")
def lenient(cluster: Callable[..., Cluster]) -> Cluster:
    """A worker whose operator trusts session code and allows mylab_models (by flags)."""
    c = cluster("lenient", "--trust-session-code", "--allow-imports", "mylab_models")
    c.worker.wait_ready()
    return c


# --- refused before anything runs ----------------------------------------------------
def test_every_type_is_checked_before_the_first_object_is_built(tmp_path: Path) -> None:
    """Data is built before callbacks: an allowed reader with a side effect must not run
    when a callback further down names a type that is not allowed."""
    marker = tmp_path / "built"
    (tmp_path / "touch_mod.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        from ptutils.data import DigitsReader

        class TouchReader(DigitsReader):
            def __init__(self, **kwargs):
                Path({str(marker)!r}).write_text("built")
                super().__init__(**kwargs)
    """))
    cfg = small({"type": "ptutils.nets.MLP", "in_features": 64, "out_features": 10},
                imports=["./touch_mod.py"])
    cfg["data"]["datasets"]["train"]["type"] = "touch_mod.TouchReader"
    cfg["callbacks"] = [{"type": "psutil.Popen", "args": ["touch", f"{marker}-popen"]}]
    with pytest.raises(RegistryError, match=r"'psutil.Popen' at `callbacks\[0\].type`"):
        validate(load_experiment(write(tmp_path, cfg)))
    assert list(tmp_path.glob("built*")) == []
    cfg["callbacks"] = []
    validate(load_experiment(write(tmp_path, cfg)))
    assert marker.exists(), "the reader does run once the config is allowed"


def test_ptutils_submit_refuses_a_package_the_operator_did_not_allow(
        tmp_path: Path, strict: Cluster) -> None:
    marker = tmp_path / "ran"
    path = write(tmp_path, hostile(marker)["psutil imported"])
    out = ptutils("submit", str(path), "--store", strict.store_uri, "--broker", strict.broker,
                  env={"PTUTILS_ALLOW_IMPORTS": ""})
    assert out.returncode == 2, out.stderr
    assert "'psutil' is not allowed" in out.stderr
    assert "--allow-imports psutil" in out.stderr and "PTUTILS_ALLOW_IMPORTS" in out.stderr
    assert "Traceback" not in out.stderr
    assert strict.store.find_sessions() == []
    assert list(tmp_path.glob("ran*")) == []


@pytest.mark.parametrize("case", list(hostile(Path("x"))))
def test_submit_refuses_hostile_configs_and_nothing_runs(tmp_path: Path, case: str) -> None:
    marker = tmp_path / "ran"
    path = write(tmp_path, hostile(marker)[case])
    with pytest.raises(ConfigError) as info:
        prepare(path)
    module = {"psutil": "psutil", "numpy": "numpy", "ptutils": "ptutils.store.local"}
    assert module[case.split()[0]] in str(info.value)
    assert "--allow-imports" in str(info.value)
    assert list(tmp_path.glob("ran*")) == []


def test_forced_hostile_sessions_fail_at_once_on_the_worker_and_nothing_runs(
        tmp_path: Path, strict: Cluster) -> None:
    marker = tmp_path / "ran"
    ids = {case: strict.force(cfg) for case, cfg in hostile(marker).items()}
    for case, sid in ids.items():
        doc = strict.finished(sid, 30)
        assert doc["status"] == "failed", case
        assert doc["attempts"] == 1, f"{case}: failed at its first attempt"
        message = doc["error"]["message"]
        assert "--allow-imports" in message, message
        expected = "is not allowed on this machine" if "imported" in case else "allowlist"
        assert expected in message and case.split()[0] in message, message
    assert list(tmp_path.glob("ran*")) == []
    assert strict.worker.proc.poll() is None


# --- session code --------------------------------------------------------------------
def test_shipped_session_code_runs_only_where_the_operator_trusts_it(
        tmp_path: Path, strict: Cluster, request: pytest.FixtureRequest) -> None:
    """Submitted from a folder deleted before the worker starts: the code travels in the
    session document; a worker without --trust-session-code refuses it at once."""
    folder = tmp_path / "submitter"
    session_file(folder)
    path = write(folder, small({"type": "my_modules.Net", "width": 16},
                               imports=["./my_modules.py"]))
    prepared = prepare(path, name="shipped")
    assert prepared[0].config["imports"] == [{"module": "my_modules",
                                              "sha256": prepared[0].code[0]["sha256"]}]
    for item in folder.iterdir():
        item.unlink()
    folder.rmdir()

    (refused,) = strict.submit(prepared)
    doc = strict.finished(refused, 30)
    assert doc["status"] == "failed" and doc["attempts"] == 1
    assert "--trust-session-code" in doc["error"]["message"]
    assert "PTUTILS_TRUST_SESSION_CODE=1" in doc["error"]["message"]
    assert list(strict.markers.iterdir()) == [], "the file never ran on the strict worker"

    lenient: Cluster = request.getfixturevalue("lenient")  # started after the deletion
    (sid,) = lenient.submit(prepared)
    doc = lenient.finished(sid)
    assert doc["status"] == "completed", doc.get("error")
    assert list(lenient.markers.iterdir()), "the shipped file ran on the trusting worker"
    state = lenient.store.load_state(lenient.store.get_checkpoint(sid))
    assert tuple(state["trainer"]["model"]["network"]["fc1.weight"].shape) == (16, 64)


def test_a_path_in_a_stored_config_is_never_read_on_the_worker(
        tmp_path: Path, strict: Cluster, lenient: Cluster) -> None:
    marker = tmp_path / "ran"
    on_disk = tmp_path / "on_disk.py"
    on_disk.write_text(f"open({str(marker)!r}, 'w').close()\n" + textwrap.dedent(NET))
    cfg = small({"type": "on_disk.Net"}, imports=[str(on_disk)])
    for c in (strict, lenient):
        doc = c.finished(c.force(cfg), 30)
        assert doc["status"] == "failed" and doc["attempts"] == 1
        assert "is a path" in doc["error"]["message"], doc["error"]["message"]
    assert not marker.exists()


def test_two_files_of_one_name_and_an_edited_one_run_side_by_side(
        tmp_path: Path, lenient: Cluster) -> None:
    file = session_file(tmp_path, width=12)
    path = write(tmp_path, small({"type": "my_modules.Net"}, imports=["./my_modules.py"]))
    first = prepare(path, name="first")
    session_file(tmp_path, width=24)  # the same file, edited
    second = prepare(path, name="second")
    third = prepare(write(tmp_path / "other", small({"type": "my_modules.Net"}, imports=[
        str(session_file(tmp_path / "other", width=8))])), name="third")
    assert file.exists()
    hashes = {p[0].code[0]["sha256"] for p in (first, second, third)}
    assert len(hashes) == 3
    ids = lenient.submit([*first, *second, *third])
    widths = []
    for sid in ids:
        doc = lenient.finished(sid)
        assert doc["status"] == "completed", doc.get("error")
        state = lenient.store.load_state(lenient.store.get_checkpoint(sid))
        widths.append(state["trainer"]["model"]["network"]["fc1.weight"].shape[0])
    assert widths == [12, 24, 8]


# --- installed packages -------------------------------------------------------------
def test_a_package_needs_the_operators_allowance_or_its_own_entry_point(
        strict: Cluster, lenient: Cluster) -> None:
    undeclared = small({"type": "mylab_models.Net", "width": 10})
    declared = small({"type": "eplab.nets.Net", "width": 10}, imports=["eplab.nets"])
    with pytest.raises(RegistryError, match="module mylab_models is not in the allowlist"):
        validate(undeclared)
    policy.configure(Policy(("mylab_models",)))  # the submitter's own allowance
    validate(undeclared)

    refused, by_entry_point = strict.force(undeclared), strict.force(declared)
    allowed = lenient.force(undeclared)
    doc = strict.finished(refused, 30)
    assert doc["status"] == "failed" and doc["attempts"] == 1
    assert "module mylab_models is not in the allowlist" in doc["error"]["message"]
    assert "--allow-imports" in doc["error"]["message"]
    for c, sid in ((strict, by_entry_point), (lenient, allowed)):
        doc = c.finished(sid)
        assert doc["status"] == "completed", doc.get("error")
    assert "session code: refused" in strict.worker.log
    assert "--allow-imports: mylab_models; session code: trusted" in lenient.worker.log


def test_the_worker_refuses_to_allow_the_standard_library(tmp_path: Path) -> None:
    out = ptutils("worker", "--gpus", "none", "--allow-imports", "mylab,subprocess",
                  "--broker", "redis://127.0.0.1:1/0", "--store", str(tmp_path / "runs"),
                  timeout=60)
    assert out.returncode == 2, out.stderr
    assert "'subprocess' is part of the Python standard library" in out.stderr


def test_ptutils_run_allows_a_package_only_when_told(tmp_path: Path, site: Path) -> None:
    path = write(tmp_path, small({"type": "mylab_models.Net", "width": 10},
                                 imports=["mylab_models"]))
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(site)]), "PTUTILS_ALLOW_IMPORTS": ""}
    store = str(tmp_path / "runs")
    out = ptutils("run", str(path), "--store", store, "-q", env=env)
    assert out.returncode == 2, out.stderr
    assert "--allow-imports mylab_models" in out.stderr
    out = ptutils("run", str(path), "--store", store, "-q", "--allow-imports", "mylab_models",
                  env=env)
    assert out.returncode == 0, out.stderr
