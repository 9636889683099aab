"""Structured config of the ``adans`` sweeper (``hydra/sweeper=adans``)."""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class AdaNSSweeperConf:
    _target_: str = "hydra_plugins.adans_sweeper.adans_sweeper.AdaNSSweeper"
    # Key of the task config whose node instantiates the search space (a
    # lightning_prune.search.SearchSpace, or an object with a `search_space` attribute).
    space_key: str = "search.space"
    # Key of the task config that receives the compression vector x of each job.
    x_key: str = "search.x"
    # uniform | zoom | genetic | gaussian, and keyword options of the sampler.
    sampler: str = "gaussian"
    sampler_options: Dict[str, Any] = field(default_factory=dict)
    # Points per AdaNS iteration (b) and number of iterations (the first batch included).
    batch_size: int = 50
    iterations: int = 50
    # Accuracy threshold A_thr, in percent.
    threshold: float = 70.0
    alpha_max: float = 0.95
    # Bisection rounds of boundary characterisation; null skips it.
    boundary_steps: Optional[int] = 6
    # First AdaNS batch: "boundary" (the boundary characterisation of Sec. IV-C of Javaheripi,
    # Samragh, Javidi and Koushanfar, "AdaNS: Adaptive Non-Uniform Sampling for Automated Design
    # of Compact DNNs", IEEE JSTSP 2020, doi:10.1109/JSTSP.2020.2992384) or "uniform".
    init: str = "boundary"
    seed: int = 0
    # Score options (lightning_prune.search.score): drop floor (points) and weight of dC.
    min_drop: float = 0.1
    cost_weight: float = 1.0
    # Optional maximum cost as a fraction of the original; over-budget points are repaired.
    budget: Optional[float] = None
    # With a budget: also move under-budget points towards the original model until they spend it.
    fill_budget: bool = False
    # Jobs per launcher call (null: a whole batch at once).
    max_batch_size: Optional[int] = None
    # Overrides of one last job run on the best x (e.g. export and fine-tune); null: no such job.
    final_overrides: Optional[List[str]] = field(default_factory=lambda: ["search.mode=final"])
    # Show a progress bar (one step per AdaNS iteration).
    progress: bool = True


ConfigStore.instance().store(group="hydra/sweeper", name="adans", node=AdaNSSweeperConf, provider="lightning_prune")
