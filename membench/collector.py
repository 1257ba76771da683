"""membench's processes and Python's garbage collector: less of its time spent on torch's heap.

Importing torch, transformers, PEFT and sympy leaves millions of objects that live as long as the
process. The cyclic collector keeps walking them: during the imports themselves (1 s of a 4.7 s
import on a 2-core machine), in every full collection while a step is simulated (0.3 to 0.5 s of
a T5-large LoRA recording or simulation), and once more at exit (1.4 s). membench's processes are
batch jobs that end when their work does, so:

* :func:`paused_collection` holds the collector off while a sweep's worker imports;
* :func:`freeze_what_is_loaded` moves what is loaded so far out of the collector's reach
  (:func:`gc.freeze`), so later collections walk only what the work itself makes;
* :func:`skip_final_collection` does the same at exit, where nothing is left to save.

Objects made afterwards are collected as before. Nothing membench writes waits on a collection:
result files are closed when written, and ``logging`` and ``weakref.finalize`` flush and clean up
in their own exit handlers, which still run.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
from typing import Iterator

_registered = False  # skip_final_collection's exit handler
_frozen = False  # freeze_what_is_loaded ran


@contextlib.contextmanager
def paused_collection() -> Iterator[None]:
    """No cyclic collection within the block (reference counting frees as usual); restored after it."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def freeze_what_is_loaded() -> None:
    """Leave every object alive now to reference counting alone (:func:`gc.freeze`), once per process.

    For a process's entry point, after its imports. What is frozen is never collected: a cycle
    among these objects that becomes garbage later (rare for modules, classes and their caches),
    and cyclic garbage that already exists when it is called (after :func:`paused_collection`, the
    imports' own: about 13,000 objects for ``membench.cli`` and ``membench.trace.record``, a few
    MB once per process, against the 0.3 to 0.5 s a full collection would cost). Only the first
    call freezes: a process that calls an entry point again (a notebook, a test
    running several sweeps) would otherwise freeze, and so keep for good, whatever cyclic garbage
    the earlier calls left uncollected.
    """
    global _frozen
    if not _frozen:
        gc.freeze()
        _frozen = True


def skip_final_collection() -> None:
    """At exit, freeze the heap before the interpreter's final collection (registered once per process).

    Exit handlers run last-registered first, so those registered earlier (``logging``'s flush,
    ``weakref.finalize``) run after this one, as before; only the interpreter's own final
    collection is skipped (an exit of 1.49 s took 0.17 s, measured on a process that imported
    ``membench.cli`` and ``membench.trace.record`` and exited).
    """
    global _registered
    if not _registered:
        atexit.register(gc.freeze)
        _registered = True
