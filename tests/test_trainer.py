"""The Trainer's log schedule survives preemption: log points do not depend on where a run
was stopped, so a run preempted between two log points resumes bit-identical."""

from __future__ import annotations

import pytest

from ptutils.runner import run_session
from ptutils.store.base import new_session_doc
from ptutils.store.local import LocalStore
from tests.helpers import (
    StopAfter,  # noqa: F401 - re-exported for older imports
    assert_bit_identical,
    digits_config,
    run_cut,
    series,
)


def _final(store, sid):
    return store.load_state(store.get_checkpoint(sid)), series(store.query_statistics(sid))


@pytest.mark.parametrize("stop_at", [7, 27])
def test_preempted_between_log_points_resumes_bit_identical(tmp_path, stop_at):
    cfg = digits_config(imports=[], callbacks=[{"type": "ptutils.callbacks.NanDetector"}],
                        log_every=10)
    with LocalStore(tmp_path / "runs") as store:
        ref = store.create_session(new_session_doc("ref", cfg, "h", 60))
        run_session(store, ref)
        doc = run_cut(store, cfg, "cut", stop_at)
        want_state, want_stats = _final(store, ref["_id"])
        got_state, got_stats = _final(store, doc["_id"])
        assert_bit_identical(want_state, got_state)
        assert got_stats == want_stats
        lr_steps = [s for phase, s, name, _ in got_stats if name == "lr"]
        assert lr_steps == [10, 20, 30, 40, 50, 60], "lr is logged on the schedule only"
