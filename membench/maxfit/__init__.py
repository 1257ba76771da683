"""``membench-maxfit``: the largest batch size and sequence length that fit a memory budget.

For each memory budget (24, 40 and 80 GiB by default), each method and each searched
dimension (``batch_size`` with ``workload.seq_len`` held fixed, ``seq_len`` with
``workload.batch_size`` held fixed), it finds the largest value whose training step fits,
and writes one row per model x method x budget x dimension::

    membench-maxfit model=roberta-large
    membench-maxfit model=llama-7b train.precision=bf16 workload.seq_len=512 method.rank=64
    membench-maxfit model=tiny-llama maxfit.budgets_bytes=[2000000] backend.name=cpu

so that a report can say "on a 24 GiB card, lora_fa fits batch 12 where lora fits 7".

**What a budget means.** A configuration fits a budget when its
``metrics["peak_allocated_bytes"]`` (``torch.cuda.max_memory_allocated`` on a GPU, its
prediction under ``simulate``) is at most the budget, in integer bytes (GiB budgets are
converted once, 1 GiB = 2**30 B). Nothing is subtracted: the peak already holds the cuBLAS
workspaces (they are allocator memory), and what ``max_memory_allocated`` does not see is not
modelled here: the CUDA context (per process, outside the allocator), the caching allocator's reserve
and fragmentation (``max_memory_reserved`` - allocated), and memory that a card's nominal size
does not deliver (a "24 GB" card reports about 23.6 GiB). For a physical card, give a budget
with that headroom taken off (e.g. ``maxfit.budgets_gib=[22]``). Simulated probes include the
cuBLAS workspaces of ``backend.device`` (64 MiB for the H100 profile, ~8 MiB for the generic
ones). By allocated memory the profile's capacity plays no part (a simulated "oom" status against
it is ignored, the predicted peak is compared with the budget, since simulation never stops
early). By reserved memory (``maxfit.by=reserved``, membench-maxfit's default) it does: the
modelled allocator stops where ``cudaMalloc`` fails on the simulated card, so a probe that runs out
of it does not fit, whatever the budget. A budget above the card's usable memory (80 GiB on the
H100 profile's 79.15) is therefore answered as the card would; simulate a larger
``backend.device`` (``custom`` with ``backend.device_memory_gib``) to search past it.

**Search.** Every probe is one :func:`membench.runner.execute` in this process (2-13 s for a
large model under ``simulate``), so the search is model-guided, never a linear scan. Probes
are cached by their run id, so budgets (and the two dimensions, which share the
configured point) share them:

* batch size: peak memory is affine in batch size for everything else fixed. Probe 1 and the
  configured ``workload.batch_size``, extrapolate the line to the budget, probe the predicted
  answer ``n`` and ``n + 1`` (``n + 1`` only if ``n`` fits); when the prediction misses, the
  line is re-fitted through the bracket's ends (secant). Two rounds in a row that do not halve
  the bracket fall back to one bisection step; with no usable line (flat peaks, e.g. full
  fine-tuning whose optimizer step dominates at small batches), the search doubles.
* sequence length: not affine (eager attention and T5's math-kernel attention keep S x S
  probabilities), so the same safeguarded search fits a quadratic through the three points
  nearest the boundary instead of a line, with the same doubling / bisection fallbacks (an
  exponential + bisection search whenever the fit misleads).
  The model's maximum length (``membench.models.max_sequence_length``, the limit
  ``membench.preflight.check_sequence_length`` enforces) caps it: when even that length fits,
  the row says ``limited_by="model_max_length"`` rather than memory.
* both stop at ``maxfit.search_cap`` (``limited_by="search_cap"``: the answer is at least that).

Each row records ``probes`` (points its search consulted) and ``new_probes`` (of those, the
ones it ran; the others came from the cache). A probe that fails (status ``error``) ends that
search with ``limited_by="error"`` and the message, and the other searches go on.

**On traces.** With ``simulate`` and ``backend.trace=auto`` (the default), each method's probes are
evaluated from its symbolic trace (:mod:`membench.trace`: recorded once per structure and cached on
disk, then milliseconds a probe, byte-identical to a direct simulation); the search then starts at 2
(size 1 is simulated directly, and only when 2 does not fit). ``maxfit.confirm`` simulates answers
directly at n and n + 1 (``method``: one answer per method, the default; ``once``; ``all``; ``off``);
if one disagrees, that method is searched again by direct simulation. Rows record the ``trace`` and
whether they were ``confirmed``. ``backend.trace=off`` probes by direct simulation throughout.

**Verification.** ``maxfit.verify=true`` re-measures each answer and answer + 1 on the
``cuda`` backend and records ``verified_on`` (the GPU), the measured peaks and whether they
agree. Without a GPU it fails before any probe, with the cuda backend's own ConfigError.

Python API: :func:`find_max_fit` (one method, one dimension, several budgets),
:func:`maxfit_rows` (several methods), :func:`write_maxfit`, :func:`load_maxfit`,
:func:`sentences`, :func:`markdown_table`.
"""

from membench.maxfit.config import (
    CONFIRM,
    DIMENSIONS,
    GiB,
    MaxFitConfig,
    MaxFitRunConfig,
    check_budgets,
    check_dimensions,
    register_maxfit_configs,
)
from membench.maxfit.probe import Probe, Prober
from membench.maxfit.search import LIMITS, Finding, find_max_fit, search_backend, search_limit
from membench.maxfit.text import GROUP, NOUN, budget_label, fit_text, markdown_table, sentences
from membench.maxfit.rows import (COLUMNS, INT_COLUMNS, confirm_finding, cuda_available_or_raise, maxfit_rows,
                                  uses_trace, verify)
from membench.maxfit.files import KIND, SCHEMA_VERSION, load_maxfit, write_maxfit
from membench.maxfit.files import _typed as _typed  # private, but the tests type frames with it
from membench.maxfit.cli import ADAPTER_ONLY_KEYS, NOTE, main, method_runs, run_maxfit
from membench.plan import plan
from membench.runner import execute  # probes call membench.maxfit.execute (replaceable in tests)

__all__ = [
    "ADAPTER_ONLY_KEYS", "COLUMNS", "CONFIRM", "DIMENSIONS", "GROUP", "INT_COLUMNS", "KIND", "LIMITS", "NOTE", "NOUN",
    "SCHEMA_VERSION", "Finding", "GiB", "MaxFitConfig", "MaxFitRunConfig", "Probe", "Prober", "budget_label",
    "check_budgets", "check_dimensions", "confirm_finding", "cuda_available_or_raise", "execute", "find_max_fit", "fit_text",
    "load_maxfit", "main", "markdown_table", "maxfit_rows", "method_runs", "plan", "register_maxfit_configs",
    "run_maxfit", "search_backend", "search_limit", "sentences", "uses_trace", "verify", "write_maxfit",
]
