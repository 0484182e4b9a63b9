"""ptutils workers under a real SLURM (tests/slurm_cluster.py): `deploy/slurm/worker.sbatch`
submitted with `sbatch` as an array job, preempted with `scancel --signal=TERM`.

The sessions are the digits config of tests/test_workers.py; whatever SLURM does to the
jobs, each final checkpoint must be bit-identical to an uninterrupted `ptutils run`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ptutils.store.mongo import MongoStore
from tests import test_workers as cluster
from tests.slurm_cluster import SlurmCluster, missing_binaries
from tests.test_workers import (
    ROOT,
    assert_matches_reference,
    submit_configs,
    wait_done,
    wait_for,
)

redis_db = cluster.redis_db  # fixtures: a fresh redis database, MongoDB, the reference runs
store_uri = cluster.store_uri
reference = cluster.reference

REVOKE_GRANULARITY_S = 2.0
"""Seconds between a job's requeue and its release (see the test)."""

SBATCH = ROOT / "deploy" / "slurm" / "worker.sbatch"

pytestmark = pytest.mark.skipif(
    bool(missing_binaries()),
    reason=f"SLURM binaries missing ({', '.join(missing_binaries())}): "
           "`apt-get install slurm-wlm munge` (.ci/run does)")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def submit_workers(slurm: SlurmCluster, tmp_path: Path, broker: str, store: str,
                   count: int) -> tuple[str, Path]:
    """`sbatch --array=0-(count-1) deploy/slurm/worker.sbatch` on CPU; the array's id and
    the folder of its logs."""
    logs = tmp_path / "slurm-logs"
    logs.mkdir()
    env = {"PTUTILS_BROKER": broker, "PTUTILS_STORE": store,
           "PTUTILS_VENV": sys.prefix, "PYTHONPATH": str(ROOT),
           "PTUTILS_WORKER_ARGS": "--gpus none --lease-ttl 3 --reconcile-every 0.5 "
                                  "--stall-after 3 --grace 20",
           "PTUTILS_TRUST_SESSION_CODE": "1",  # the configs ship worker_fixtures.py
           "PTUTILS_TEST_STEP_SECONDS": "0.1"}
    array = slurm.sbatch(f"--array=0-{count - 1}", "--gres=none", "--cpus-per-task=1",
                         "--chdir", str(ROOT), "--output", f"{logs}/%A_%a.log",
                         str(SBATCH), env=env)
    return array, logs


def job_field(slurm: SlurmCluster, job: str, name: str) -> str | None:
    """A field of `scontrol show job` (None while the controller does not answer)."""
    return slurm.jobs().get(job, {}).get(name)


def job_logs(logs: Path) -> str:
    return "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-5000:]}"
                     for p in sorted(logs.glob("*.log")))


def test_array_job_trains_is_preempted_requeues_and_continues_bit_identical(
        tmp_path, slurm, redis_db, store_uri, reference):
    array, logs = submit_workers(slurm, tmp_path, redis_db, store_uri, 2)
    tasks = [f"{array}_0", f"{array}_1"]
    try:
        wait_for(lambda: all(job_field(slurm, t, "JobState") == "RUNNING"
                             for t in tasks), 30, "both array tasks running")
        with MongoStore(store_uri) as store:
            ids = submit_configs(store, redis_db, tmp_path, 1, 2)
            wait_for(lambda: all(store.get_session(s)["step"] == 20
                                 and store.get_session(s).get("lease") for s in ids),
                     120, "both sessions in Train[20,40) on the SLURM workers")
            holders = {store.get_session(s)["lease"]["worker"].split("-cpu")[0] for s in ids}
            assert holders == {f"slurm-{slurm.jobs()[t]['JobId']}" for t in tasks}, holders

            slurm.run("scancel", "--signal=TERM", array)  # what preemption delivers
            wait_for(lambda: all(job_field(slurm, t, "Restarts") == "1" for t in tasks), 60,
                     "both array tasks requeued by worker.sbatch")
            reached = {}
            for sid in ids:
                doc = store.get_session(sid)
                assert doc["checkpoint"]["kind"] == "preempt", doc["checkpoint"]
                assert 20 < doc["step"] < 40 and doc["lease"] is None
                store.load_state(store.get_checkpoint(sid, doc["step"], "preempt"))
                reached[sid] = doc["step"]
            log = job_logs(logs)
            assert log.count("worker exited with status 0") == 2, log
            assert "Warm shutdown" in log

            # SLURM holds a requeued job back (BeginTime); start them now, as a scheduler
            # with a free node would. Not within the second of the requeue: slurmd refuses
            # a job credential as old as the revocation of the job's last run ("Job
            # credential revoked", timestamps in whole seconds): the reason of the hold.
            wait_for(lambda: all(job_field(slurm, t, "JobState") == "PENDING" for t in tasks), 30,
                     "the requeued array tasks pending")
            time.sleep(REVOKE_GRANULARITY_S)
            for t in tasks:
                slurm.run("scontrol", "update", f"JobId={t}", "StartTime=now")
            wait_for(lambda: all(job_field(slurm, t, "JobState") == "RUNNING" for t in tasks),
                     60, "the requeued array tasks running again")
            wait_done(store, ids, 120)
            for seed, sid in zip((1, 2), ids):
                assert_matches_reference(store, sid, reference, seed)
        log = job_logs(logs)
        assert log.count("restart 1") == 2
        for sid, step in reached.items():  # the continuation the preempted worker requeued
            assert f"Train[{step},40) of {sid[:8]}: done" in log, step
    except Exception:
        print(job_logs(logs))
        print(slurm.logs())
        raise
