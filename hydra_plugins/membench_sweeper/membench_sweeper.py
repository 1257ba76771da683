"""``hydra/sweeper=membench``: Hydra's basic sweeper, plus what a memory sweep needs.

* **Grids.** ``hydra.sweeper.grids`` is a list of grids; the sweep is their
  union (each grid is a cartesian product, as in the basic sweeper). The paper
  sweep needs this: each model has its own batch sizes and sequence length,
  and full fine-tuning has no rank axis.
* **Checks first.** Every job's config is composed and validated before the
  first one runs, so a bad value in job 90 fails in a second, not an hour in.
* **Skips.** A job whose result file already exists (``ok`` or ``oom``) is not
  launched unless ``force=true``; an interrupted sweep, run again, resumes.
* **Counts.** Each job prints ``[i/N]``; the sweep ends with a tally.
* **Dry run.** ``hydra.sweeper.dry_run=true`` lists the jobs it would launch, and launches none.
* **One GPU, one run.** With ``submitit_local`` (``hydra/launcher=isolated``) jobs
  are launched one at a time unless ``hydra.sweeper.max_batch_size`` says otherwise.
* **Traces where they pay.** Per symbolic trace, the jobs no cached trace answers share one
  recording, symbolic in the sizes they vary, or are simulated directly when too few share it
  (:func:`membench.sweep.plan_traces`).
* **Two waves.** Simulated jobs go in two waves: one job per trace, and the jobs no trace covers,
  first; then the jobs that evaluate those traces (:func:`membench.sweep.trace_waves`), so no two
  workers of ``hydra/launcher=processes`` (Hydra's joblib launcher: one worker process per core)
  record the same trace. A sweep that measures on a GPU is launched one job at a time.
* **Evaluated here.** A job a cached trace answers takes milliseconds to evaluate, less than a
  launcher takes to start a job: the sweeper evaluates it in its own process (same result file,
  same ``[i/N]`` line; no per-job Hydra output folder).

Command-line overrides apply to every grid and win over the grid's own values.
``method=full`` drops adapter-only keys (``method.rank``, ...) so a rank axis
measures full fine-tuning once instead of failing.
"""


import copy
import itertools
import logging
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)



@dataclass
class MembenchSweeperConf:
    _target_: str = "hydra_plugins.membench_sweeper.membench_sweeper.MembenchSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None
    grids: List[Dict[str, Any]] = field(default_factory=list)
    dry_run: bool = False  # list the jobs (after checks and skips) and launch nothing


ConfigStore.instance().store(group="hydra/sweeper", name="membench", node=MembenchSweeperConf, provider="membench")


_ABSENT = object()  # what OmegaConf.select returns for a key the config does not have


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _cartesian(overrides: List[Override]) -> List[List[str]]:
    """Every job of one grid, as the basic sweeper expands it: a sweep per key, the last value of a key wins."""
    choices: dict[str, List[str]] = {}
    for override in overrides:
        key = override.get_key_element()
        if not override.is_sweep_override():
            choices[key] = [f"{key}={override.get_value_element_as_str()}"]
        elif override.is_discrete_sweep():
            choices[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            raise HydraException(f"{override.input_line}: the membench sweeper takes lists (a,b,c), not "
                                 f"{override.value_type.name if override.value_type else 'this sweep'}")
    return [list(job) for job in itertools.product(*choices.values())]


def _config_groups(loader: Any, parent: str = "") -> set:
    """Every config group the loader knows (``model``, ``hydra/launcher``, ...), from its public listing."""
    groups = set()
    for name in loader.list_groups(parent):
        path = f"{parent}/{name}" if parent else name
        groups |= {path} | _config_groups(loader, path)
    return groups


class MembenchSweeper(Sweeper):
    def __init__(self, max_batch_size: Optional[int] = None, params: Optional[Dict[str, str]] = None,
                 grids: Optional[List[Dict[str, Any]]] = None, dry_run: bool = False) -> None:
        super().__init__()
        self.max_batch_size = max_batch_size
        self.params = dict(params or {})
        self.grids = [dict(grid) for grid in (grids or [])] or [{}]
        self.dry_run = dry_run
        self.config: Optional[DictConfig] = None
        self.launcher = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def _expand(self, arguments: List[str]) -> List[List[str]]:
        """Every job's override list: the union of the grids, command line last, duplicates dropped."""
        parser = self._parser
        jobs: dict[tuple, None] = {}
        for grid in self.grids:
            grid_overrides = [f"{key}={value}" for key, value in {**self.params, **grid}.items()]
            parsed = parser.parse_overrides(grid_overrides + list(arguments))
            for job in _cartesian(parsed):
                jobs.setdefault(tuple(job), None)
        return [list(job) for job in jobs]

    def _task_config(self, overrides: List[str]) -> DictConfig:
        """The job's config without ``hydra``, as the job will see it.

        Composing from scratch costs ~0.1 s, too slow for hundreds of jobs, so the config composed
        for a set of group choices (``model=...``, ``method=...``) is reused and plain ``key=value``
        overrides are applied to a copy with ``OmegaConf.update``, as Hydra applies them after
        composing. Anything else (``+key``, ``~key``, a key that does not exist) is composed by Hydra
        in full, so its rules and its error messages are Hydra's own.
        """
        parsed = self._parser.parse_overrides(overrides)
        groups = tuple(o.input_line for o in parsed if o.key_or_group in self._groups)
        if groups not in self._composed:
            self._composed[groups] = self._composed_in_full(list(groups))
        config = copy.deepcopy(self._composed[groups])
        values = [o for o in parsed if o.input_line not in groups and not o.is_hydra_override()]
        for override in values:
            plain = not (override.is_add() or override.is_force_add() or override.is_delete())
            found = OmegaConf.select(config, override.key_or_group, default=_ABSENT, throw_on_resolution_failure=False)
            if not plain or found is _ABSENT:
                return self._composed_in_full(overrides)
            OmegaConf.update(config, override.key_or_group, override.value(), merge=True)
        return config

    def _composed_in_full(self, overrides: List[str]) -> DictConfig:
        config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with read_write(config), open_dict(config):
            del config["hydra"]
        return config

    def _triage(self, jobs: List[List[str]]) -> "tuple[List[List[str]], List[Any], Counter]":
        """Validate every job, drop adapter keys for full fine-tuning, skip finished runs.

        Returns the jobs to launch, their RunConfigs and the tally (``skipped``).
        """
        from membench.cli import to_run_config
        from membench.config import ADAPTER_ONLY_KEYS
        from membench.errors import ConfigError
        from membench.files import check_writable_dir
        from membench.sweep import existing_result

        todo: dict[tuple, Any] = {}
        seen: set[tuple] = set()
        writable: set[str] = set()
        tally: Counter = Counter()
        for number, overrides in enumerate(jobs, 1):
            config = self._task_config(overrides)
            if config.method.kind == "full":
                kept = [o for o in overrides if _key(o) not in ADAPTER_ONLY_KEYS]
                if kept != overrides:
                    overrides, config = kept, self._task_config(kept)
            try:
                run = to_run_config(config)
                if run.results_dir not in writable:  # one probe file per folder, not per job
                    check_writable_dir(run.results_dir, key="results_dir")
                    writable.add(run.results_dir)
            except ConfigError as error:  # before anything ran: the CLI's exit code for bad input
                print(f"membench: error: job {number} of {len(jobs)} ({' '.join(overrides)}): {error}",
                      file=sys.stderr)
                sys.exit(2)
            if tuple(overrides) in seen:
                continue
            seen.add(tuple(overrides))
            if not run.force and existing_result(run) is not None:
                tally["skipped"] += 1
                continue
            todo[tuple(overrides)] = run
        return [list(job) for job in todo], list(todo.values()), tally

    def _plan_traces(self, jobs: List[List[str]], runs: List[Any]) -> "tuple[List[List[str]], List[Any]]":
        """``backend.trace=off`` for jobs too few to pay for recording their trace, and
        ``backend.trace_symbols`` for the jobs of a trace that need only some sizes symbolic
        (:func:`membench.sweep.plan_traces`). The run id and the bytes are the same every way; only the time differs.
        """
        import dataclasses

        from membench.sweep import plan_traces

        plan = plan_traces(runs)  # only runs a trace covers: simulated, backend.trace=auto
        self._answered = plan.answered
        if plan.direct:
            print(f"membench sweep: {len(plan.direct)} job(s) simulated directly: too few share their trace, and "
                  "none is cached, for recording it to pay", flush=True)
        changed = {index: (["backend.trace=off"], {"trace": "off"}) for index in plan.direct}
        changed.update({index: ([f"backend.trace_symbols={symbols}"], {"trace_symbols": symbols})
                        for index, symbols in plan.symbols.items()})
        for index, (overrides, fields) in changed.items():
            jobs[index] = [*jobs[index], *overrides]
            runs[index] = dataclasses.replace(runs[index], backend=dataclasses.replace(runs[index].backend, **fields))
        return jobs, runs

    def _workers(self) -> int:
        """How many worker processes joblib starts for ``hydra/launcher=processes`` (1: it runs jobs in this process)."""
        from joblib import effective_n_jobs

        return effective_n_jobs(self.config.hydra.launcher.get("n_jobs") or 1)

    def _warm_workers(self) -> Optional[threading.Thread]:
        """Start ``hydra/launcher=processes``' worker processes, importing what a job imports, while this
        process composes and checks the jobs (seconds of each, side by side instead of one after the other).

        joblib keeps one pool of workers per process and hands it to the next ``Parallel`` with the same
        settings: this one passes the launcher's, as Hydra's joblib launcher does.
        """
        if self.dry_run or not self._launcher_is("JoblibLauncher"):
            return None
        workers = self._workers()
        if workers < 2:
            return None
        from joblib import Parallel, delayed

        from membench.sweep import warm_worker

        settings = {key: value for key, value in OmegaConf.to_container(self.config.hydra.launcher).items()
                    if key != "_target_"}
        settings["backend"] = "loky"
        for key in ("pre_dispatch", "batch_size", "max_nbytes"):  # as Hydra's launcher converts them
            if settings.get(key):
                try:
                    settings[key] = int(settings[key])
                except ValueError:
                    pass

        def warm() -> None:
            try:
                Parallel(**settings)(delayed(warm_worker)() for _ in range(workers))
            except Exception as error:  # noqa: BLE001 - only a head start: the launch starts its own workers
                log.debug("warming the worker processes failed: %r", error)

        thread = threading.Thread(target=warm, name="membench-warm-workers", daemon=True)
        thread.start()
        return thread

    def _take_numbers(self, count: int) -> int:
        """The first of ``count`` consecutive job numbers (the ``i - 1`` of ``[i/N]``), in dispatch order."""
        with self._lock:
            first, self._launched = self._launched, self._launched + count
        return first

    def _evaluate_here(self, job: List[str], run: Any) -> Optional[str]:
        """One job a cached trace answers, evaluated in this process as the job would (same file, same
        line); its state, or None when it crashed (reported at the end, as a crashed job is)."""
        from membench.cli import measure_and_write
        from membench.errors import ConfigError
        from membench.sweep import position

        number = self._take_numbers(1)
        try:
            return measure_and_write(run, number)[0]
        except ConfigError as error:  # as the job would report it (membench.cli.task)
            print(f"{position(number)}{' '.join(job)} → invalid: {error}", flush=True)
            return "invalid"
        except Exception as error:  # noqa: BLE001 - reported at the end, as a crashed job is
            with self._lock:
                self._crashed.append((job, error))
            return None

    def _launcher_is(self, suffix: str) -> bool:
        return str(self.config.hydra.launcher.get("_target_", "")).endswith(suffix)

    def _batches(self, jobs: List[List[str]], runs: List[Any]) -> List[List[int]]:
        """Job indices per ``launcher.launch`` call.

        submitit_local and joblib start every job of a batch at once: on one GPU they would
        measure each other, so such a sweep goes one job at a time (``submitit_local``, meant
        for GPUs, always does). Simulated jobs on joblib's workers go in trace waves.
        """
        indices = list(range(len(jobs)))
        if self.max_batch_size:
            return [indices[start:start + self.max_batch_size] for start in range(0, len(jobs), self.max_batch_size)]
        if self._launcher_is("submitit_launcher.LocalLauncher"):
            return [[index] for index in indices]
        from membench.sweep import trace_waves

        if self._launcher_is("JoblibLauncher"):
            from membench.backends import resolve_name

            if any(resolve_name(run.backend) == "cuda" for run in runs):
                return [[index] for index in indices]
        return trace_waves(runs, frozenset(self._answered))

    def sweep(self, arguments: List[str]) -> Any:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        self._parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        self._composed: dict[tuple, DictConfig] = {}
        self._groups = _config_groups(self.hydra_context.config_loader)
        warming = self._warm_workers()
        try:
            jobs, runs, tally = self._triage(self._expand(arguments))
        finally:
            if warming is not None:  # before any launch: the warm-up and the first wave share the workers
                warming.join()
        results_dir = self.config.get("results_dir")
        print(f"membench sweep: {len(jobs) + tally['skipped']} configurations; {tally['skipped']} already "
              f"measured in {results_dir} (skipped; force=true re-measures), {len(jobs)} to run", flush=True)
        jobs, runs = self._plan_traces(jobs, runs)
        if self.dry_run:
            for number, job in enumerate(jobs, 1):
                print(f"[{number}/{len(jobs)}] {' '.join(job)}", flush=True)
            return []
        if not jobs:
            return []
        Path(self.config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, Path(self.config.hydra.sweep.dir) / "multirun.yaml")
        import os

        from membench.sweep import TOTAL_ENV, CachedTraceWatcher, answered_by_cached_traces

        total = f"++hydra.job.env_set.{TOTAL_ENV}={len(jobs)}"
        total_before = os.environ.get(TOTAL_ENV)
        os.environ[TOTAL_ENV] = str(len(jobs))  # the [i/N] of the jobs evaluated here
        # Jobs print their own line to this terminal, except submitit's (into log files): repeat those.
        repeat_lines = self._launcher_is("submitit_launcher.LocalLauncher") or self._launcher_is("SlurmLauncher")
        # Workers in other processes leave this one idle while a wave runs: it evaluates the next wave meanwhile.
        in_background = self._launcher_is("JoblibLauncher") and self._workers() > 1
        returns: List[Sequence[JobReturn]] = []
        failed: List[JobReturn] = []
        self._crashed: List[tuple[List[str], BaseException]] = []  # jobs the sweeper evaluated itself
        self._launched = 0
        self._lock = threading.Lock()
        waves = self._batches(jobs, runs)

        def evaluate(index: int) -> Optional[str]:
            return self._evaluate_here(jobs[index], runs[index])

        try:
            for number, batch_indices in enumerate(waves):
                # The first wave: what planning found in the cache just now; a later one: what is there since.
                here = (self._answered & set(batch_indices) if number == 0
                        else answered_by_cached_traces(runs, batch_indices))
                for index in sorted(here):  # milliseconds each: less than a launcher spends starting a job
                    state = evaluate(index)
                    if state is not None:
                        tally[state] += 1
                batch = [[*jobs[index], total] for index in batch_indices if index not in here]
                if not batch:
                    continue
                following = waves[number + 1] if in_background and number + 1 < len(waves) else []
                first = self._take_numbers(len(batch))
                watcher = CachedTraceWatcher(runs, following, evaluate)
                with watcher:
                    results = self.launcher.launch(batch, initial_job_idx=first)
                for index, state in watcher.states.items():
                    if state is not None:
                        tally[state] += 1
                if following:
                    waves[number + 1] = [index for index in following if index not in watcher.states]
                for result in results:
                    if result.status == JobStatus.FAILED:
                        failed.append(result)
                        continue
                    state, line = result.return_value
                    tally[state] += 1
                    if repeat_lines:  # the job printed its line into a log file; repeat it here
                        print(line, flush=True)
                returns.append(results)
        finally:
            if total_before is None:
                os.environ.pop(TOTAL_ENV, None)
            else:
                os.environ[TOTAL_ENV] = total_before
        crashed = self._crashed
        counts = ", ".join(f"{count} {state}" for state, count in sorted(tally.items()))
        print(f"membench sweep: done ({counts}); results in {results_dir}; tables and figures: membench-report "
              f"{results_dir}", flush=True)
        if failed or crashed:
            if failed:
                first, overrides = failed[0], failed[0].overrides or []
                try:
                    first.return_value  # a failed job's return_value raises what the job raised
                    cause = None
                except Exception as error:  # noqa: BLE001 - reported, with the job that raised it
                    cause = error
            else:
                overrides, cause = crashed[0]
            raise HydraException(f"{len(failed) + len(crashed)} job(s) crashed; the first ({' '.join(overrides)}): "
                                 f"{cause!r}") from cause
        return returns


__all__ = ["MembenchSweeper", "MembenchSweeperConf", "Sweeper"]
