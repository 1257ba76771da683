"""membench.collector: processes keep the collector off torch's heap, and lose nothing by it."""

from __future__ import annotations

import gc
import subprocess
import sys

CHILD = """
import atexit, gc, logging, sys
logging.basicConfig(filename=sys.argv[1], level=logging.INFO)
atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count() > 0, flush=True))  # runs after membench's
from membench.collector import paused_collection, skip_final_collection
with paused_collection():
    print("collecting while paused:", gc.isenabled(), flush=True)
print("collecting after:", gc.isenabled(), flush=True)
skip_final_collection()
skip_final_collection()
print("frozen before exit:", gc.get_freeze_count() > 0, flush=True)
logging.getLogger("membench").info("written by a handler that logging flushes at exit")
"""


def test_a_process_freezes_its_heap_at_exit_once_and_still_flushes_its_logs(tmp_path):
    log = tmp_path / "child.log"
    done = subprocess.run([sys.executable, "-c", CHILD, str(log)], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == ["collecting while paused: False", "collecting after: True",
                                        "frozen before exit: False", "frozen at exit: True"]
    assert "written by a handler that logging flushes at exit" in log.read_text()


def test_the_exit_handler_is_registered_once_per_process(monkeypatch):
    import atexit

    import membench.collector as collector

    registered = []
    monkeypatch.setattr(collector, "_registered", False)
    monkeypatch.setattr(atexit, "register", registered.append)
    collector.skip_final_collection()
    collector.skip_final_collection()
    assert registered == [gc.freeze]


def test_a_warmed_sweep_worker_imports_with_the_collector_off_then_freezes(monkeypatch):
    import membench.collector as collector
    from membench.sweep import warm_worker

    calls = []
    monkeypatch.setattr(collector, "_frozen", False)
    monkeypatch.setattr(gc, "disable", lambda: calls.append("disable"))
    monkeypatch.setattr(gc, "enable", lambda: calls.append("enable"))
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    monkeypatch.setattr(collector, "skip_final_collection", lambda: calls.append("at exit"))
    warm_worker()
    assert calls == ["disable", "enable", "freeze", "at exit"]


def test_an_entry_point_freezes_only_at_its_first_call(monkeypatch):
    import membench.collector as collector

    frozen = []
    monkeypatch.setattr(collector, "_frozen", False)
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(True))
    collector.freeze_what_is_loaded()
    collector.freeze_what_is_loaded()
    assert frozen == [True]
