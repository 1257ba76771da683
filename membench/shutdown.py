"""Leaving a process quickly: no final garbage collection of the heap torch and its friends leave.

At exit the interpreter collects garbage once more before it tears modules down. After importing
torch, transformers, PEFT and sympy that collection walks millions of objects: 1.4 s per process
on a 2-core machine, paid by the ``membench`` process and by each worker of a sweep with
``hydra/launcher=processes`` (the sweep waits for its workers to exit). Nothing membench writes
waits on it: result files are closed when written, and ``logging`` and ``weakref.finalize``
flush and clean up in their own exit handlers, which still run.
"""

from __future__ import annotations

import atexit
import gc

_registered = False


def skip_final_collection() -> None:
    """At exit, move every object the collector tracks out of its reach (:func:`gc.freeze`).

    Registered once per process. Exit handlers run last-registered first, so those registered
    earlier (``logging``'s flush, ``weakref.finalize``) run after this one, as before; only the
    interpreter's own final collection is skipped (an exit of 1.49 s took 0.17 s, measured on a
    process that imported ``membench.cli`` and ``membench.trace.record`` and exited).
    """
    global _registered
    if not _registered:
        atexit.register(gc.freeze)
        _registered = True
