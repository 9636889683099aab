"""The ``adans`` Hydra sweeper: a thin shell around :class:`lightning_prune.search.CompressionSearch`.

Every batch the search asks for is sent through the configured launcher (basic, joblib,
submitit, ray, ...) as one job per point, with the point passed as the override
``<x_key>=[x_1,...,x_d]``. A job returns ``{"accuracy": percent, "cost": number}`` (extra keys
are kept). The sweeper

- wraps the task function so that every finished job also writes its point, result, job
  number and overrides to ``adans_result.json`` in its own output folder;
- saves the search state to ``<sweep dir>/adans_state.json`` before and after every batch;
- when that file exists at start (``hydra.sweep.dir`` set to an interrupted sweep), resumes
  from it, taking the results of jobs that finished before the interruption from their
  ``adans_result.json`` instead of launching them again; a state file that is not valid JSON
  or not a sweep state raises a ``ValueError`` naming it and saying how to recover (delete it);
- when that file is missing but the sweep folder holds job results of an earlier run,
  rebuilds the state from them (see :meth:`AdaNSSweeper._finished_jobs`): the search is
  replayed from its seed, and every point whose result is on disk is told that result instead
  of being launched, so finished evaluations are never run again;
- at the end writes ``optimization_results.yaml`` and ``adans_progress.png`` (best score
  against evaluations), logs a summary and, if ``final_overrides`` is set, launches one last
  job on the best point with those overrides (e.g. ``search.mode=final`` to build, fine-tune
  and save the compressed model).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import Container, DictConfig, OmegaConf

# lightning_prune.search (and torch behind it) is imported only when a sweep runs: Hydra imports
# every installed plugin at start-up, and an app that never uses this sweeper should not pay for it.
if TYPE_CHECKING:
    from lightning_prune.search import CompressionSearch, SearchSpace

log = logging.getLogger(__name__)

STATE_FILE = "adans_state.json"
RESULT_FILE = "adans_result.json"


def _plain(value: Any) -> Any:
    """A job's return value as JSON-compatible values."""
    if isinstance(value, Container):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    return value


def format_x(x: Sequence[float]) -> str:
    """``[v1,v2,...]`` with every value written so that it reads back exactly."""
    return "[" + ",".join(repr(float(v)) for v in x) + "]"


def _recovery(path: Path) -> str:
    return (f"delete {path} to recover: the sweep then rebuilds its state from the job results ({RESULT_FILE}) in "
            f"{path.parent} and launches only the evaluations that are missing")


# Top-level entries of adans_state.json and their JSON types.
STATE_LAYOUT: Dict[str, Tuple[type, str]] = {
    "job_idx": (int, "an int"), "sampler": (str, "a string"), "sampler_options": (dict, "an object"),
    "search": (dict, "an object"),
}


def read_state(path: Path) -> Dict[str, Any]:
    """The sweep state saved in ``path`` (``adans_state.json``), its top-level layout checked.

    Raises:
        ValueError: naming the file and how to recover, when it is not UTF-8 JSON or not an
            object with the entries of :data:`STATE_LAYOUT` (``final`` is optional).
    """
    path = Path(path).resolve()
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a valid AdaNS sweep state: it is not valid JSON ({error}); "
                         f"{_recovery(path)}") from error
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a valid AdaNS sweep state: it holds a JSON {type(state).__name__}, not an "
                         f"object; {_recovery(path)}")
    for key, (kind, described) in STATE_LAYOUT.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            got = "nothing" if key not in state else f"{type(value).__name__} {value!r}"[:80]
            raise ValueError(f"{path} is not a valid AdaNS sweep state: {key!r} must be {described}, got {got}; "
                             f"{_recovery(path)}")
    return state


class RecordingTask:
    """The task function, plus: write ``{"x": ..., "result": ...}`` to the job's output folder.

    A module-level class (not a closure) so that launchers that pickle the task function
    (joblib, submitit, ray) can send it to their workers.
    """

    def __init__(self, task_function: TaskFunction, x_key: str) -> None:
        self.task_function = task_function
        self.x_key = x_key

    def __call__(self, cfg: DictConfig) -> Any:
        result = self.task_function(cfg)
        x = OmegaConf.select(cfg, self.x_key)
        hydra_cfg = HydraConfig.get()
        # job and overrides let a sweep that lost its state file tell its own evaluations (and
        # its final job) apart from jobs run with other overrides (see AdaNSSweeper._finished_jobs)
        record = {"x": _plain(x), "result": _plain(result), "job": hydra_cfg.job.num,
                  "overrides": list(hydra_cfg.overrides.task)}
        out = Path(hydra_cfg.runtime.output_dir) / RESULT_FILE
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, out)
        return result


class AdaNSSweeper(Sweeper):
    """AdaNS search of a compression vector, one Hydra job per candidate (see module doc)."""

    def __init__(
        self,
        space_key: str = "search.space",
        x_key: str = "search.x",
        sampler: str = "gaussian",
        sampler_options: Optional[Dict[str, Any]] = None,
        batch_size: int = 50,
        iterations: int = 50,
        threshold: float = 70.0,
        alpha_max: float = 0.95,
        boundary_steps: Optional[int] = 6,
        init: str = "boundary",
        seed: int = 0,
        min_drop: float = 0.1,
        cost_weight: float = 1.0,
        budget: Optional[float] = None,
        fill_budget: bool = False,
        max_batch_size: Optional[int] = None,
        final_overrides: Optional[List[str]] = None,
        progress: bool = True,
    ) -> None:
        from lightning_prune.search import make_sampler

        super().__init__()
        options = dict(sampler_options or {})
        make_sampler(sampler, **options)  # validates the name and options now, not after the reference job
        if max_batch_size is not None and (not isinstance(max_batch_size, int) or max_batch_size < 1):
            raise ValueError(f"max_batch_size must be a positive int or null, got {max_batch_size!r}")
        self.space_key = space_key
        self.x_key = x_key
        self.sampler = sampler
        self.sampler_options = options
        self.settings = dict(
            batch_size=batch_size, iterations=iterations, threshold=threshold, alpha_max=alpha_max,
            boundary_steps=boundary_steps, init=init, seed=seed, min_drop=min_drop, cost_weight=cost_weight,
            budget=budget, fill_budget=fill_budget,
        )
        self.max_batch_size = max_batch_size
        self.final_overrides = list(final_overrides) if final_overrides else None
        self.progress = progress
        self.config: Optional[DictConfig] = None
        self.launcher: Optional[Launcher] = None
        self.hydra_context: Optional[HydraContext] = None
        self.job_idx = 0
        self._search: Optional[CompressionSearch] = None
        self._final: Any = None
        self._finals_before: Dict[tuple, Any] = {}  # results of final jobs found on disk, by point

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=RecordingTask(task_function, self.x_key), config=config
        )

    # --- building blocks ----------------------------------------------------------------------
    def _space(self) -> SearchSpace:
        from lightning_prune.search import SearchSpace

        assert self.config is not None
        node = OmegaConf.select(self.config, self.space_key)
        if node is None:
            raise ValueError(
                f"hydra.sweeper.space_key: the task config has no '{self.space_key}' node to build the search space from"
            )
        space = instantiate(node)
        space = getattr(space, "search_space", space)
        if not isinstance(space, SearchSpace):
            raise TypeError(
                f"'{self.space_key}' must instantiate a lightning_prune.search.SearchSpace (or an object with a "
                f"search_space attribute), got {type(space).__name__}"
            )
        return space

    def _fixed_arguments(self, arguments: List[str]) -> List[str]:
        assert self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        for override in parser.parse_overrides(arguments):
            if override.is_sweep_override():
                raise ValueError(
                    f"the adans sweeper searches '{self.x_key}' itself; a sweep over "
                    f"'{override.get_key_element()}' is not supported (got '{override.input_line}')"
                )
            if override.get_key_element().lstrip("+~") == self.x_key:
                raise ValueError(f"'{self.x_key}' is set by the adans sweeper; do not override it")
        return list(arguments)

    def _launch(self, arguments: List[str], points: List[np.ndarray], extra: Sequence[str] = ()) -> List[Any]:
        assert self.launcher is not None
        overrides = [[*arguments, *extra, f"{self.x_key}={format_x(x)}"] for x in points]
        if not overrides:
            return []
        chunk = self.max_batch_size or len(overrides)
        values: List[Any] = []
        for start in range(0, len(overrides), chunk):
            part = overrides[start : start + chunk]
            idx = self.job_idx
            self.job_idx += len(part)  # reserved before launching: a resumed sweep never reuses a job folder
            self._write()
            for ret in self.launcher.launch(part, initial_job_idx=idx):
                values.append(_plain(ret.return_value))  # raises the job's exception if it failed
        return values

    # --- persistence ----------------------------------------------------------------------------
    def _write(self) -> None:
        """Save the whole sweep state (atomically) to ``adans_state.json``."""
        assert self._search is not None
        state = {"job_idx": self.job_idx, "sampler": self.sampler, "sampler_options": self.sampler_options,
                 "search": self._search.state_dict(), "final": self._final}
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_path)

    def _load(self, search: CompressionSearch) -> None:
        """Restore the sweep from ``self.state_path``; ValueError naming the file when it cannot be."""
        state = read_state(self.state_path)
        saved = (state["sampler"], state["sampler_options"])
        if saved != (self.sampler, self.sampler_options):
            raise ValueError(
                f"{self.state_path} was saved by a sweep with sampler {saved}, this one uses "
                f"{(self.sampler, self.sampler_options)}; use a new hydra.sweep.dir"
            )
        try:
            search.load_state_dict(state["search"])
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
            path = Path(self.state_path).resolve()
            raise ValueError(
                f"{path} cannot be resumed: its 'search' entry does not load ({type(error).__name__}: {error}). If the "
                f"sweep settings changed, use a new hydra.sweep.dir; if the file is damaged, {_recovery(path)}"
            ) from error
        self.job_idx = state["job_idx"]
        self._final = state.get("final")

    def _finished_jobs(self, arguments: Sequence[str]) -> Tuple[Dict[tuple, Dict[str, Any]], Dict[tuple, Any], int]:
        """Results already written by jobs in this sweep folder: ``(evaluations, final jobs, last job number)``.

        ``evaluations`` and ``final jobs`` map a point (tuple of floats) to the result of the job
        that evaluated it (with the overrides ``arguments``) or ran the final job on it (with
        ``arguments`` and ``final_overrides``). Records of jobs run with other overrides are left
        out (their results belong to another task config), so are unreadable records (a job
        killed while writing: it runs again); when two records hold the same point, the one of
        the lower job number is kept. Records written before job numbers and overrides were
        recorded are all taken as evaluations. ``last job number`` is the highest job number
        found (in records, or as a numbered job folder), -1 if none.

        This is what a sweep whose ``adans_state.json`` is missing is rebuilt from. The search
        is deterministic given its settings (seed included) and the results it is told, so
        replaying it from the start with these results reproduces the lost state exactly: the
        history, the boundary box, the sampler's state and the random generator's state, the
        log of evaluations, and (when the final job's record is found) the final result. What
        cannot be recovered: results of jobs that died before writing their record (they run
        again), and anything of a run with other sweeper settings (a different seed, batch
        size, sampler, ...): the replay then asks other points, and only those that coincide
        with a point on disk are reused. New jobs are numbered after the last job found.
        """
        def job_number(path: Path, record: Dict[str, Any]) -> int:
            num = record.get("job")
            if isinstance(num, int) and not isinstance(num, bool):
                return num
            first = path.relative_to(self.sweep_dir).parts[0]
            return int(first) if first.isdigit() else -1

        x_prefix = f"{self.x_key}="
        plain_args = sorted(arguments)
        final_args = sorted([*arguments, *(self.final_overrides or [])])
        found: List[Tuple[int, str, tuple, Any]] = []
        last = max((int(p.name) for p in self.sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), default=-1)
        for path in self.sweep_dir.rglob(RESULT_FILE):
            try:
                record = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue  # a job killed while writing: evaluate it again
            if not isinstance(record, dict) or not isinstance(record.get("x"), list) or "result" not in record:
                continue
            try:
                x = tuple(float(v) for v in record["x"])
            except (TypeError, ValueError):
                continue
            num = job_number(path, record)
            last = max(last, num)
            overrides = record.get("overrides")
            if overrides is None:
                kind = "evaluation"
            elif isinstance(overrides, list):
                rest = sorted(str(o) for o in overrides if not str(o).startswith(x_prefix))
                kind = "evaluation" if rest == plain_args else "final" if self.final_overrides and rest == final_args else ""
            else:
                kind = ""
            if kind:
                found.append((num, kind, x, record["result"]))
        evaluations: Dict[tuple, Dict[str, Any]] = {}
        finals: Dict[tuple, Any] = {}
        for num, kind, x, result in sorted(found, key=lambda item: item[0]):
            if kind == "evaluation" and isinstance(result, dict):
                evaluations.setdefault(x, result)
            elif kind == "final":
                finals.setdefault(x, result)
        return evaluations, finals, last

    # --- the sweep --------------------------------------------------------------------------------
    def sweep(self, arguments: List[str]) -> Any:
        from lightning_prune.search import CompressionSearch, make_sampler

        assert self.config is not None and self.launcher is not None
        arguments = self._fixed_arguments(arguments)
        self.sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, self.sweep_dir / "multirun.yaml")
        self.state_path = self.sweep_dir / STATE_FILE

        space = self._space()
        search = CompressionSearch(space, make_sampler(self.sampler, **self.sampler_options), **self.settings)
        self._search, self._final = search, None
        done_before, self._finals_before, last_job = self._finished_jobs(arguments)
        if self.state_path.is_file():
            self._load(search)
            log.info(f"AdaNS: resuming {self.state_path} ({search.status()['evaluations']} evaluations done, "
                     f"{len(done_before)} job results on disk)")
        elif done_before or self._finals_before:
            log.info(f"AdaNS: no {STATE_FILE} in {self.sweep_dir}; rebuilding the sweep state from the "
                     f"{len(done_before)} job results on disk (replaying the search; those points are not launched again)")
        self.job_idx = max(self.job_idx, last_job + 1)  # never reuse a job folder
        log.info(f"AdaNS: {self.sampler} sampler over {space.d} dimensions, batch {self.settings['batch_size']}, "
                 f"{self.settings['iterations']} iterations, A_thr = {self.settings['threshold']} %; "
                 f"sweep folder {self.sweep_dir}")

        bar = self._progress_bar(search)
        while True:
            points = search.ask()
            if not points:
                break
            self._write()  # the pending batch is part of the state
            results: List[Optional[Dict[str, Any]]] = [done_before.get(tuple(map(float, x))) for x in points]
            todo = [i for i, r in enumerate(results) if r is None]
            if len(todo) < len(points):
                log.info(f"AdaNS: {len(points) - len(todo)} of {len(points)} points of this batch finished before "
                         "the interruption; not launched again")
            for i, value in zip(todo, self._launch(arguments, [points[i] for i in todo])):
                if not isinstance(value, dict):
                    raise ValueError(
                        f"an AdaNS job must return a dict with 'accuracy' (percent) and 'cost', got {value!r}; "
                        f"is '{self.x_key}' read by the task function?"
                    )
                results[i] = value
            phase = search.phase
            search.tell(results)  # type: ignore[arg-type]
            self._write()
            self._report(search, phase, bar)
        if bar is not None:
            bar.close()
        return self._finish(search, space, arguments)

    def _progress_bar(self, search: CompressionSearch) -> Any:
        if not self.progress:
            return None
        from tqdm import tqdm

        bar = tqdm(total=self.settings["iterations"], desc="AdaNS", unit="it", file=sys.stderr, dynamic_ncols=True)
        bar.update(search.ada.iteration)
        return bar

    def _report(self, search: CompressionSearch, phase: str, bar: Any) -> None:
        status = search.status()
        if phase != "search":
            if phase == "reference" and search.reference is not None:
                log.info(f"AdaNS: original model: accuracy {search.reference['accuracy']:.2f} %, "
                         f"cost {search.reference['cost']:,.0f}")
            elif phase == "boundary" and search.boundary is not None:
                log.info(f"AdaNS: boundary round {search.boundary.round} done ({status['evaluations']} evaluations)")
            return
        post = {"best": f"{status['best_score']:.4g}", "alpha": f"{status['alpha']:.3f}",
                "acc": f"{status['best_accuracy']:.2f}%", "cost": f"{100 * status['best_cost_fraction']:.1f}%"}
        if bar is not None:
            bar.set_postfix(post, refresh=False)
            bar.update(search.ada.iteration - bar.n)
        else:
            log.info(f"AdaNS iteration {search.ada.iteration}/{self.settings['iterations']}: {post}")

    def _finish(self, search: CompressionSearch, space: SearchSpace, arguments: List[str]) -> Any:
        from lightning_prune.search import plot_progress, summary

        best = search.best()
        theta = search.theta
        text = summary(search.status(), best, search.reference, None if theta is None else theta.tolist(), space.names)
        log.info("\n" + text)
        plot_progress({self.sampler: search.ada.scores}, self.sweep_dir / "adans_progress.png",
                      title=f"AdaNS-{self.sampler}: best score against evaluations")
        results = {
            "name": "adans",
            "sampler": self.sampler,
            "best_x": best["x"],
            "best_score": best["score"],
            "best_accuracy": best["accuracy"],
            "best_cost": best["cost"],
            "best_cost_fraction": best["cost_fraction"],
            "reference": search.reference,
            "theta": None if theta is None else theta.tolist(),
            "names": space.names,
            "evaluations": search.status()["evaluations"],
            "iterations": search.ada.iteration,
        }
        if self.final_overrides:
            if self._final is None:  # a final job that finished before its result was saved in the state
                self._final = self._finals_before.get(tuple(float(v) for v in best["x"]))
            if self._final is None:
                self._final = self._launch(arguments, [np.asarray(best["x"])], extra=self.final_overrides)[0]
            results["final"] = self._final
            log.info(f"AdaNS: final job on the best x: {self._final}")
        self._write()  # the finished state (also when a rebuilt sweep launched nothing)
        OmegaConf.save(OmegaConf.create(_sanitize(results)), self.sweep_dir / "optimization_results.yaml")
        return results


def _sanitize(value: Any) -> Any:
    """Values OmegaConf can store (floats that are not NaN/inf stay floats)."""
    if isinstance(value, dict):
        return {k: _sanitize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_sanitize(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
