"""AdaNS core (lightning_prune.search): score, boundary, Algorithm 1, samplers, persistence.

Everything here runs on synthetic functions with known maxima; no model, no Hydra.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lightning_prune.search import (
    AdaNS,
    BoundaryCharacterization,
    Box,
    CompressionSearch,
    Dimension,
    GaussianReconstruction,
    GaussianSampler,
    GeneticSampler,
    SearchSpace,
    Scorer,
    UniformSampler,
    ZoomSampler,
    accuracy_penalty,
    characterize,
    integer_setting,
    make_sampler,
    plot_progress,
    proximity,
    reconstruction_error,
    score,
)
from lightning_prune.search.samplers import split_counts

# --- a 2-D landscape like Fig. 10 of Javaheripi, Samragh, Javidi and Koushanfar, "AdaNS: Adaptive
# Non-Uniform Sampling for Automated Design of Compact DNNs" (IEEE JSTSP 2020, doi:10.1109/JSTSP.2020.2992384):
# one global and two local maxima ---------------------------------------------------------------
PEAK = np.array([0.4, 0.3])
BUMPS = [((0.4, 0.3), 1.0, 0.1), ((0.8, 0.8), 0.7, 0.08), ((0.15, 0.8), 0.6, 0.08)]


def landscape(x: np.ndarray) -> np.ndarray:
    x = np.atleast_2d(x)
    out = np.full(len(x), 0.05)
    for centre, height, width in BUMPS:
        out += height * np.exp(-np.sum((x - np.array(centre)) ** 2, axis=1) / (2 * width**2))
    return out


F_MAX = float(landscape(PEAK)[0])


# --- score --------------------------------------------------------------------------------
def test_score_golden_values() -> None:
    # Above the threshold: PEN = drop.  e^0.5 / 2
    assert score(0.5, 91.5, 93.5, 80.0) == pytest.approx(math.exp(0.5) / 2.0)
    # Below: PEN = drop + e^(A_thr - A) = 15.5 + e^2
    assert accuracy_penalty(78.0, 93.5, 80.0) == pytest.approx(15.5 + math.exp(2.0))
    assert score(0.5, 78.0, 93.5, 80.0) == pytest.approx(math.exp(0.5) / (15.5 + math.exp(2.0)))
    # At the threshold the penalty is the drop alone (eq. 4 uses >=).
    assert accuracy_penalty(80.0, 93.5, 80.0) == pytest.approx(13.5)
    # The drop is floored: as accurate as (or better than) the original -> min_drop.
    assert accuracy_penalty(94.0, 93.5, 80.0) == pytest.approx(0.1)
    assert score(0.0, 93.5, 93.5, 80.0, min_drop=0.5) == pytest.approx(2.0)
    assert score(0.25, 92.5, 93.5, 80.0, cost_weight=4.0) == pytest.approx(math.e)


def test_score_orders_candidates_as_eq3() -> None:
    # log f = dC - log PEN: halving the drop is worth ln 2 of cost reduction.
    a = score(0.3, 92.5, 93.5, 80.0)
    b = score(0.3 + math.log(2), 91.5, 93.5, 80.0)
    assert a == pytest.approx(b)
    # Falling well below the threshold costs much more than the drop alone (e per point).
    assert score(0.9, 75.0, 93.5, 80.0) < score(0.0, 85.0, 93.5, 80.0) / 2


def test_scorer_and_validation() -> None:
    s = Scorer(base_accuracy=93.5, base_cost=1000, threshold=80.0)
    assert s(91.5, 500) == pytest.approx(math.exp(0.5) / 2.0)
    assert s.cost_reduction(250) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="threshold"):
        Scorer(base_accuracy=70.0, base_cost=1, threshold=75.0)
    with pytest.raises(ValueError, match="base_cost"):
        Scorer(base_accuracy=90.0, base_cost=0, threshold=75.0)
    with pytest.raises(ValueError, match="accuracy"):
        score(0.1, 0.93, 193.5, 80.0)
    with pytest.raises(ValueError, match="cost_reduction"):
        score(1.5, 90.0, 93.5, 80.0)
    with pytest.raises(ValueError, match="min_drop"):
        accuracy_penalty(90.0, 93.5, 80.0, min_drop=0.0)


# --- space ----------------------------------------------------------------------------------
def test_integer_setting_golden_values() -> None:
    assert integer_setting(0.0, "rate", 16) == 16
    assert integer_setting(0.3, "rate", 10) == 7  # floor(3.0) removed despite round-off
    assert integer_setting(0.99, "rate", 16) == 1  # floor(15.84) = 15 removed
    assert integer_setting(1.0, "rate", 16) == 1  # never below one channel
    assert integer_setting(0.5, "rank", 9) == 4
    assert integer_setting(0.0, "rank", 9) == 1
    assert integer_setting(1.0, "rank", 9) == 9
    with pytest.raises(ValueError, match="kind"):
        integer_setting(0.5, "width", 3)
    with pytest.raises(ValueError, match="value"):
        integer_setting(1.5, "rank", 3)


def test_space_and_box() -> None:
    space = SearchSpace.of(["rate", "rank", "rate"])
    assert space.identity.tolist() == [0.0, 1.0, 0.0]
    assert space.most_compressed.tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="unique"):
        SearchSpace((Dimension("a", "rate"), Dimension("a", "rank")))
    with pytest.raises(ValueError, match="kind"):
        Dimension("a", "prune")
    with pytest.raises(ValueError, match="3 entries"):
        space.check([0.1, 0.2])
    box = Box.from_theta(space, [0.4, 0.3, 1.0])
    assert box.lower.tolist() == [0.0, 0.3, 0.0]
    assert box.upper.tolist() == [0.4, 1.0, 1.0]
    x = box.initial(4000, np.random.default_rng(0))
    assert box.contains(x).all()
    # Rates: N(theta/2, theta/2) restricted to [0, theta] is symmetric about theta/2.
    assert x[:, 0].mean() == pytest.approx(0.2, abs=0.01)
    assert x[:, 2].mean() == pytest.approx(0.5, abs=0.02)
    # Ranks: U[theta, 1].
    assert x[:, 1].mean() == pytest.approx(0.65, abs=0.01)
    assert x[:, 1].min() >= 0.3 and x[:, 1].std() == pytest.approx(0.7 / math.sqrt(12), abs=0.01)


# --- Algorithm 1 ----------------------------------------------------------------------------
def test_proximity_parameter() -> None:
    alpha, good = proximity(np.array([10.0, 9.0, 5.0, 1.0]), num_good=2, alpha_max=0.95)
    assert alpha == pytest.approx(0.9) and good.tolist() == [True, True, False, False]
    alpha, good = proximity(np.array([10.0, 9.0, 5.0, 1.0]), num_good=2, alpha_max=0.5)
    assert alpha == pytest.approx(0.5) and good.tolist() == [True, True, True, False]
    alpha, good = proximity(np.array([10.0, 9.0, 5.0, 1.0]), num_good=4, alpha_max=0.95)
    assert alpha == pytest.approx(0.1) and good.all()
    with pytest.raises(ValueError, match="positive"):
        proximity(np.array([1.0, -1.0]), 1, 0.9)


def test_adans_alpha_rises_and_ask_is_idempotent() -> None:
    ada = AdaNS(SearchSpace.of(["rate", "rate"]).box(), "gaussian", batch_size=10, init="uniform", seed=1)
    first = ada.ask()
    np.testing.assert_array_equal(first, ada.ask())
    ada.tell(landscape(first))
    ada.run(landscape, 12)
    assert ada.alphas[0] < 0.5 < ada.alphas[-1]
    assert len(ada.scores) == 120 and ada.iteration == 12
    with pytest.raises(ValueError, match="10 entries"):
        ada.ask()
        ada.tell([1.0])


def test_adans_validation() -> None:
    box = SearchSpace.of(["rate"]).box()
    with pytest.raises(ValueError, match="sampler"):
        AdaNS(box, "bayes", batch_size=4)
    with pytest.raises(ValueError, match="alpha_max"):
        AdaNS(box, "zoom", batch_size=4, alpha_max=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        AdaNS(box, "zoom", batch_size=0)
    with pytest.raises(ValueError, match="init"):
        AdaNS(box, "zoom", batch_size=4, init="random")
    with pytest.raises(RuntimeError, match="ask"):
        AdaNS(box, "zoom", batch_size=4).tell([1.0] * 4)


# --- samplers on the 2-D landscape -----------------------------------------------------------
def _run(name: str, seed: int, iterations: int = 15, batch: int = 20) -> AdaNS:
    ada = AdaNS(SearchSpace.of(["rate", "rate"]).box(), name, batch_size=batch, init="uniform", seed=seed)
    ada.run(landscape, iterations)
    return ada


def _near_peak(ada: AdaNS, from_iteration: int) -> float:
    late = ada.xs[ada.batch_of >= from_iteration]
    return float(np.mean(np.linalg.norm(late - PEAK, axis=1) < 0.1))


def test_gaussian_concentrates_near_the_global_maximum() -> None:
    # Javaheripi et al. 2020, Fig. 10: Gaussian finds the global maximum and concentrates its samples there.
    near, best = [], []
    for seed in range(4):
        ada = _run("gaussian", seed)
        near.append(_near_peak(ada, 10))
        best.append(ada.best()[1])
    uniform = [_near_peak(_run("uniform", seed), 10) for seed in range(4)]
    assert min(best) > 0.99 * F_MAX
    assert np.mean(near) > 0.6
    # A uniform sampler puts ~pi 0.1^2 = 3 % of its points there.
    assert np.mean(uniform) < 0.1


def test_every_sampler_improves_on_its_first_batch_and_stays_in_the_box() -> None:
    box = Box(np.array([0.1, 0.0]), np.array([0.9, 0.6]), np.zeros(2))
    for name in ("uniform", "zoom", "genetic", "gaussian"):
        ada = AdaNS(box, name, batch_size=20, init="uniform", seed=3)
        ada.run(landscape, 10)
        assert box.contains(ada.xs).all(), name
        if name != "uniform":
            # adaptive samplers draw better batches than the first one on average
            assert ada.scores[ada.batch_of >= 5].mean() > 1.5 * ada.scores[ada.batch_of == 0].mean(), name


def test_uniform_sampler_statistics() -> None:
    box = Box(np.array([0.2, 0.0]), np.array([0.6, 1.0]), np.zeros(2))
    x = UniformSampler().propose(5000, box, np.zeros((0, 2)), np.zeros(0), np.zeros(0, bool), np.random.default_rng(0))
    assert box.contains(x).all()
    np.testing.assert_allclose(x.mean(axis=0), [0.4, 0.5], atol=0.01)
    np.testing.assert_allclose(x.std(axis=0), [0.4 / math.sqrt(12), 1 / math.sqrt(12)], atol=0.01)


def test_gaussian_sampler_parts() -> None:
    assert split_counts(20, [0.45, 0.45, 0.10]) == [9, 9, 2]
    assert split_counts(50, [0.45, 0.45, 0.10]) == [23, 22, 5]
    assert GaussianSampler().counts(10) == (5, 4, 1)
    with pytest.raises(ValueError, match="must be 1"):
        GaussianSampler(local=0.5, cross=0.5, uniform=0.5)
    with pytest.raises(ValueError, match="pair_strategy"):
        GaussianSampler(pair_strategy=5)
    box = SearchSpace.of(["rate", "rate"]).box()
    xs = np.array([[0.2, 0.5], [0.6, 0.5], [0.9, 0.9]])
    scores = np.array([2.0, 2.0, 1.0])
    good = np.array([True, True, False])
    rng = np.random.default_rng(0)
    # Cross only: midpoint of the two good samples, sigma = |x1 - x2| / 2 = (0.1, 0).
    pair = np.array([[0.4, 0.5], [0.6, 0.5], [0.9, 0.9]])
    cross = GaussianSampler(local=0, cross=1, uniform=0).propose(4000, box, pair, scores, good, rng)
    np.testing.assert_allclose(cross.mean(axis=0), [0.5, 0.5], atol=0.005)
    assert cross[:, 0].std() == pytest.approx(0.1, abs=0.005) and np.all(cross[:, 1] == 0.5)
    # Local only: centred on good samples, sigma = span of S_g (0.4 in dim 0, 0 in dim 1).
    local = GaussianSampler(local=1, cross=0, uniform=0).propose(4000, box, xs, scores, good, rng)
    assert np.all(local[:, 1] == 0.5) and box.contains(local).all()
    assert local[:, 0].std() > 0.2


def test_gaussian_pair_strategies() -> None:
    pool = np.array([[0.0, 0.0], [0.1, 0.0], [1.0, 1.0]])
    f = np.array([3.0, 2.0, 1.0])
    rng = np.random.default_rng(0)
    assert GaussianSampler(pair_strategy=2).pairs(2, pool, f, rng) == [(0, 1), (0, 2)]
    assert GaussianSampler(pair_strategy=3).pairs(3, pool, f, rng) == [(0, 2), (1, 2), (2, 0)]
    pairs4 = GaussianSampler(pair_strategy=4).pairs(6, pool, f, rng)
    assert [a for a, _ in pairs4] == [0, 1, 2, 0, 1, 2] and all(a != b for a, b in pairs4)


def test_genetic_selection_crossover_and_mutation() -> None:
    g = GeneticSampler()
    rng = np.random.default_rng(0)
    scores = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    for _ in range(50):
        chosen = g.select(4, scores, rng)
        assert 0 not in chosen and sorted(chosen.tolist()) == [1, 2, 3, 4]  # min eliminated, no repeats
    counts = np.bincount(np.concatenate([g.select(1, scores, rng) for _ in range(4000)]), minlength=5)
    np.testing.assert_allclose(counts / 4000, [0, 0.1, 0.2, 0.3, 0.4], atol=0.03)  # proportional to f - f_min
    # No crossover, no mutation: children are copies of good parents.
    box = SearchSpace.of(["rate"] * 6).box()
    xs = rng.random((8, 6))
    good = np.array([True] * 6 + [False] * 2)
    copies = GeneticSampler(p_cross=0, p_mutate=0).propose(5, box, xs, np.arange(1.0, 9.0), good, rng)
    assert all(any(np.array_equal(c, p) for p in xs[good]) for c in copies)
    # Crossover only swaps elements between pair members: each column keeps its values.
    # (scores 1, 2, 3: the two best are the parents, the worst is never selected)
    swapped = GeneticSampler(p_cross=1, p_swap=0.5, p_mutate=0).propose(2, box, xs[:3], np.array([1.0, 2.0, 3.0]),
                                                                        np.ones(3, bool), rng)
    np.testing.assert_allclose(np.sort(swapped, axis=0), np.sort(xs[1:3], axis=0))
    assert not any(np.array_equal(c, p) for c in swapped for p in xs[1:3])  # some elements were swapped
    # Mutation adds N(0, 0.2) noise to about p_tweak of the elements and clips to the box.
    parent = np.full((1, 6), 0.5)
    kids = GeneticSampler(p_cross=0, p_mutate=1, p_tweak=0.5).propose(2000, box, parent, np.ones(1), np.ones(1, bool), rng)
    changed = kids != 0.5
    assert changed.mean() == pytest.approx(0.5, abs=0.02)
    assert kids[changed].std() == pytest.approx(0.2, abs=0.01) and box.contains(kids).all()


def test_zoom_divides_the_best_region_along_its_longest_side() -> None:
    box = Box(np.zeros(2), np.array([1.0, 0.5]), np.zeros(2))
    z = ZoomSampler()
    xs = np.array([[0.1, 0.1], [0.9, 0.1], [0.2, 0.4], [0.6, 0.2]])
    good = np.array([True, False, True, False])
    rng = np.random.default_rng(0)
    first = z.propose(400, box, xs, np.ones(4), good, rng)
    # The whole box (w = 1/2) is halved along dimension 0 (length 1 > 0.5).
    assert [(lo.tolist(), hi.tolist()) for lo, hi in z.regions] == [([0, 0], [0.5, 0.5]), ([0.5, 0], [1, 0.5])]
    # w = 2/2 on the left, 0/2 on the right: every new point is on the left.
    assert np.all(first[:, 0] < 0.5)
    z.propose(10, box, xs, np.ones(4), good, rng)  # left (0.5 x 0.5) is halved along dim 0 again
    assert len(z.regions) == 3 and z.regions[0][1].tolist() == [0.25, 0.5]
    volumes = sum(np.prod(hi - lo) for lo, hi in z.regions)
    assert volumes == pytest.approx(0.5)
    state = json.loads(json.dumps(z.state_dict()))
    z2 = ZoomSampler()
    z2.load_state_dict(state)
    assert z2.state_dict() == z.state_dict()


def test_make_sampler_and_reprs() -> None:
    assert isinstance(make_sampler("genetic", p_cross=0.4), GeneticSampler)
    assert "p_cross=0.4" in repr(make_sampler("genetic", p_cross=0.4))
    with pytest.raises(ValueError, match="p_swap"):
        GeneticSampler(p_swap=2)


# --- persistence ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["zoom", "genetic", "gaussian"])
def test_adans_resume_gives_the_same_run(name: str) -> None:
    box = SearchSpace.of(["rate", "rank", "rate"]).box()

    def f(x: np.ndarray) -> np.ndarray:
        return landscape(x[:, [0, 2]]) + 0.1 * x[:, 1]

    straight = AdaNS(box, name, batch_size=8, seed=5)
    straight.run(f, 6)
    first = AdaNS(box, name, batch_size=8, seed=5)
    first.run(f, 3)
    first.ask()  # a pending batch is part of the state
    state = json.loads(json.dumps(first.state_dict()))
    resumed = AdaNS(box, name, batch_size=8, seed=5)
    resumed.load_state_dict(state)
    resumed.run(f, 6)
    np.testing.assert_array_equal(resumed.xs, straight.xs)
    np.testing.assert_array_equal(resumed.scores, straight.scores)
    with pytest.raises(ValueError, match="batch_size"):
        AdaNS(box, name, batch_size=9, seed=5).load_state_dict(state)


# --- boundary characterisation ------------------------------------------------------------
def monotone_accuracy(x: np.ndarray) -> np.ndarray:
    """90 % minus a known, monotone loss per dimension (dims: rate, rate, rank, rate), at least 10 %.

    Like a real network, each dimension can be compressed some way before accuracy drops."""
    x = np.atleast_2d(x)
    relu = lambda v: np.maximum(v, 0.0)  # noqa: E731
    loss = 40 * relu(x[:, 0] - 0.2) ** 2 + 100 * relu(x[:, 1] - 0.1) ** 3 + 20 * relu(0.7 - x[:, 2]) + 5 * relu(x[:, 3] - 0.5)
    return np.maximum(10.0, 90.0 - loss)


def test_boundary_characterization_on_a_known_monotone_curve() -> None:
    space = SearchSpace.of(["rate", "rate", "rank", "rate"])
    calls: list[int] = []

    def acc(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        return monotone_accuracy(x)

    theta = characterize(space, acc, threshold=80.0, steps=8)
    # Exact boundaries: 40 (t - 0.2)^2 = 10, 100 (t - 0.1)^3 = 10, 20 (0.7 - r) = 10, 5 (t - 0.5) < 10.
    expected = np.array([0.7, 0.1 + 0.1 ** (1 / 3), 0.2, 1.0])
    assert np.all(np.abs(theta - expected) <= 2**-8)
    # theta is on the safe side: accuracy above the threshold there.
    for i in range(4):
        x = space.identity.copy()
        x[i] = theta[i]
        assert monotone_accuracy(x)[0] > 80.0
    # Round 0 tests every extreme; dimension 3 passes it and is not bisected.
    assert calls == [4] + [3] * 8


def test_boundary_state_and_box() -> None:
    space = SearchSpace.of(["rate", "rank"])
    bc = BoundaryCharacterization(space, threshold=80.0, steps=3)
    assert bc.ask().tolist() == [[1.0, 1.0], [0.0, 0.0]]  # round 0: the most compressed setting of each dim
    bc.tell([70.0, 85.0])
    state = json.loads(json.dumps(bc.state_dict()))
    bc2 = BoundaryCharacterization(space, threshold=80.0, steps=3)
    bc2.load_state_dict(state)
    assert bc2.ask().tolist() == [[0.5, 1.0]]  # dim 1 (rank) passed at rank 0; dim 0 bisects
    box = bc2.box()
    assert box.lower.tolist() == [0.0, 0.0] and box.upper.tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="steps"):
        BoundaryCharacterization(space, 80.0, steps=-1)


# --- the whole search ---------------------------------------------------------------------
class ToyModel:
    """Accuracy from ``monotone_accuracy``, cost = 1000 * (kept fraction averaged)."""

    space = SearchSpace(
        tuple(Dimension(n, k) for n, k in zip("abcd", ["rate", "rate", "rank", "rate"])),
        predict_cost=lambda x: 1000.0 * float(np.mean([1 - x[0], 1 - x[1], x[2], 1 - x[3]])),
    )

    def __init__(self) -> None:
        self.evaluated: list[tuple[float, ...]] = []

    def __call__(self, points: list[np.ndarray]) -> list[dict]:
        out = []
        for x in points:
            self.evaluated.append(tuple(x))
            out.append({"accuracy": float(monotone_accuracy(x)[0]), "cost": self.space.predict_cost(x)})
        return out


def test_compression_search_end_to_end() -> None:
    toy = ToyModel()
    search = CompressionSearch(toy.space, "gaussian", batch_size=12, iterations=8, threshold=80.0, boundary_steps=5, seed=0)
    best = search.run(toy)
    assert search.done and search.ask() == []
    assert search.reference == {"accuracy": 90.0, "cost": 1000.0}
    assert len(set(toy.evaluated)) == len(toy.evaluated)  # nothing evaluated twice
    assert len(search.ada.scores) == 8 * 12
    # every AdaNS point lies inside the boundary box
    assert search.ada.box.contains(search.ada.xs).all()
    np.testing.assert_allclose(search.theta, [0.7, 0.1 + 0.1 ** (1 / 3), 0.2, 1.0], atol=2**-5)
    assert best["score"] == pytest.approx(search.scorer(best["accuracy"], best["cost"]))
    # The optimum keeps the accuracy (drops under min_drop cost nothing) and compresses each
    # dimension to the end of its flat part: cost 0.725, score 10 e^0.275 = 13.2. The original
    # model scores 1 / 0.1 = 10.
    assert best["accuracy"] > 89.5 and best["cost_fraction"] < 0.8
    assert 12.0 < best["score"] <= 10 * math.exp(0.275) + 1e-9


def test_compression_search_top_lists_the_best_distinct_points() -> None:
    toy = ToyModel()
    search = CompressionSearch(toy.space, "gaussian", batch_size=6, iterations=3, threshold=60.0, boundary_steps=None,
                               seed=0)
    search.run(toy)
    top = search.top(4)
    assert top[0] == search.best() and len(top) == 4
    assert [t["score"] for t in top] == sorted(search.ada.scores, reverse=True)[:4]
    assert len({tuple(t["x"]) for t in top}) == 4
    assert len(search.top(1000)) == len({tuple(x) for x in search.ada.xs.tolist()})
    with pytest.raises(ValueError, match="k must be a positive int"):
        search.top(0)


def test_compression_search_budget_repair() -> None:
    toy = ToyModel()
    search = CompressionSearch(toy.space, "genetic", batch_size=10, iterations=4, threshold=60.0, boundary_steps=None,
                               budget=0.5, seed=0)
    search.run(toy)
    fractions = [toy.space.predict_cost(np.array(x)) / 1000 for x in toy.evaluated[1:]]
    assert max(fractions) <= 0.5
    # An over-budget point moves towards the most compressed corner just far enough.
    x = np.array([[0.1, 0.0, 0.9, 0.2], [0.9, 0.9, 0.1, 0.9]])
    fixed = search.repair(x)
    assert toy.space.predict_cost(fixed[0]) / 1000 == pytest.approx(0.5, abs=1e-5)
    assert toy.space.predict_cost(fixed[0]) / 1000 <= 0.5
    far = np.array([1.0, 1.0, 0.0, 1.0])
    step = (fixed[0] - x[0]) / (far - x[0])
    np.testing.assert_allclose(step, step[0], atol=1e-5)  # on the segment from x to the corner
    np.testing.assert_array_equal(fixed[1], x[1])  # already within budget: untouched
    with pytest.raises(ValueError, match="predict"):
        CompressionSearch(SearchSpace.of(["rate"]), budget=0.5)
    tight = CompressionSearch(toy.space, "gaussian", batch_size=4, iterations=2, threshold=80.0, boundary_steps=4,
                              budget=0.05)
    with pytest.raises(ValueError, match="cannot be met"):
        tight.run(toy)


def test_compression_search_fill_budget_moves_under_budget_points_to_the_budget() -> None:
    toy = ToyModel()
    search = CompressionSearch(toy.space, "genetic", batch_size=10, iterations=4, threshold=60.0, boundary_steps=None,
                               budget=0.5, fill_budget=True, seed=0)
    search.run(toy)
    fractions = [toy.space.predict_cost(np.array(x)) / 1000 for x in toy.evaluated[1:]]  # after the reference
    assert max(fractions) <= 0.5 and min(fractions) >= 0.5 - 1e-4  # every candidate spends the budget
    x = np.array([[0.1, 0.0, 0.9, 0.2], [0.9, 0.9, 0.1, 0.9]])  # over and under the budget
    fixed = search.repair(x)
    for k, end in ((0, np.array([1.0, 1.0, 0.0, 1.0])), (1, toy.space.identity)):
        assert 0.5 - 1e-5 <= toy.space.predict_cost(fixed[k]) / 1000 <= 0.5
        step = (fixed[k] - x[k]) / (end - x[k])
        np.testing.assert_allclose(step, step[0], atol=1e-5)  # on the segment from x to end
    under = search.repair(np.array([[0.9, 0.9, 0.1, 0.9]]))  # the same point: the same repair
    np.testing.assert_array_equal(under[0], fixed[1])
    restored = CompressionSearch(toy.space, "genetic", batch_size=10, iterations=4, threshold=60.0,
                                 boundary_steps=None, budget=0.5, seed=0)
    with pytest.raises(ValueError, match="fill_budget"):
        restored.load_state_dict(search.state_dict())
    with pytest.raises(ValueError, match="fill_budget needs a budget"):
        CompressionSearch(toy.space, fill_budget=True)
    with pytest.raises(TypeError, match="fill_budget must be a bool"):
        CompressionSearch(toy.space, budget=0.5, fill_budget=1)


def test_compression_search_rejects_a_threshold_above_the_original() -> None:
    search = CompressionSearch(ToyModel.space, threshold=95.0)
    with pytest.raises(ValueError, match="threshold"):
        search.run(ToyModel())
    with pytest.raises(ValueError, match="accuracy"):
        CompressionSearch(ToyModel.space).tell([{"acc": 1.0}])


def test_compression_search_resume_does_not_reevaluate() -> None:
    straight_toy = ToyModel()
    settings = dict(sampler="gaussian", batch_size=6, iterations=4, threshold=80.0, boundary_steps=3, seed=2)
    CompressionSearch(ToyModel.space, **settings).run(straight_toy)

    toy = ToyModel()
    search = CompressionSearch(ToyModel.space, **settings)
    saved = None
    for _ in range(6):  # reference + 4 boundary rounds + first AdaNS batch
        search.tell(toy(search.ask()))
        saved = json.loads(json.dumps(search.state_dict()))
    search.ask()  # killed while the next batch runs
    resumed = CompressionSearch(ToyModel.space, **settings)
    resumed.load_state_dict(saved)
    before = len(toy.evaluated)
    resumed.run(toy)
    assert toy.evaluated == straight_toy.evaluated
    assert len(toy.evaluated) - before == len(straight_toy.evaluated) - before
    with pytest.raises(ValueError, match="threshold"):
        CompressionSearch(ToyModel.space, **(settings | {"threshold": 70.0})).load_state_dict(saved)


# --- reconstruction and report --------------------------------------------------------------
def test_gaussian_reconstruction() -> None:
    rng = np.random.default_rng(0)
    xs = rng.random((60, 3))
    fs = landscape(xs[:, :2]) + xs[:, 2]
    rec = GaussianReconstruction().fit(xs, fs)
    np.testing.assert_allclose(rec.predict(xs), fs, rtol=1e-6)  # N kernels interpolate N samples
    # beta = d / (8 ln 2): a kernel is down to 1/2 at the midpoint to its nearest sample.
    two = GaussianReconstruction().fit(np.array([[0.2, 0.2, 0.2], [0.4, 0.3, 0.6]]), np.ones(2))
    assert two.kernels(np.array([[0.3, 0.25, 0.4]]))[0, 0] == pytest.approx(0.5)
    # New points next to evaluated ones are predicted far better than points between them (eq. 14).
    near = xs[:20] + 1e-4
    far = (xs[:20] + xs[20:40]) / 2

    def f(x: np.ndarray) -> np.ndarray:
        return landscape(x[:, :2]) + x[:, 2]

    assert reconstruction_error(xs, fs, near, f(near)) < 0.01 < reconstruction_error(xs, fs, far, f(far))


def test_plot_progress(tmp_path) -> None:
    ada = _run("gaussian", 0, iterations=3, batch=5)
    path = plot_progress({"gaussian": ada.scores, "uniform": _run("uniform", 0, 3, 5).scores}, tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="traces"):
        plot_progress({}, tmp_path / "q.png")
