"""membench.shutdown: processes skip the interpreter's final garbage collection, and nothing else."""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import atexit, gc, logging, sys
logging.basicConfig(filename=sys.argv[1], level=logging.INFO)
atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count() > 0, flush=True))  # runs after membench's
from membench.shutdown import skip_final_collection
skip_final_collection()
skip_final_collection()
print("frozen before exit:", gc.get_freeze_count() > 0, flush=True)
logging.getLogger("membench").info("written by a handler that logging flushes at exit")
"""


def test_a_process_freezes_its_heap_at_exit_once_and_still_flushes_its_logs(tmp_path):
    log = tmp_path / "child.log"
    done = subprocess.run([sys.executable, "-c", CHILD, str(log)], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == ["frozen before exit: False", "frozen at exit: True"]
    assert "written by a handler that logging flushes at exit" in log.read_text()


def test_the_handler_is_registered_once_per_process(monkeypatch):
    import atexit

    import membench.shutdown as shutdown

    registered = []
    monkeypatch.setattr(shutdown, "_registered", False)
    monkeypatch.setattr(atexit, "register", registered.append)
    shutdown.skip_final_collection()
    shutdown.skip_final_collection()
    assert len(registered) == 1
