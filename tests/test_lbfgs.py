"""glo_search.lbfgs: the L-BFGS that fits content_leakage's probe."""

import numpy as np
import pytest
import torch

from glo_search import lbfgs


def _quadratic(matrix: np.ndarray, target: np.ndarray):
    def objective(x):
        residual = x - target
        return float(0.5 * residual @ matrix @ residual), matrix @ residual

    return objective


def test_quadratic_reaches_its_minimum():
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((20, 20))
    matrix = basis @ basis.T + 0.1 * np.eye(20)  # condition number about 570
    target = rng.standard_normal(20)
    objective = _quadratic(matrix, target)
    # 20 pairs for 20 dimensions keep the whole history. The default change tolerance,
    # 1e-12, would stop the fit once the value is about 1e-10.
    fit = lbfgs.minimize(
        objective, np.zeros(20), gradient_tolerance=1e-9, change_tolerance=0, history_size=20
    )
    assert np.abs(matrix @ (fit.x - target)).max() <= 1e-9
    assert fit.evaluations >= fit.iterations


def test_rosenbrock_from_the_usual_start():
    def rosenbrock(x):
        a, b = x
        value = (1 - a) ** 2 + 100 * (b - a * a) ** 2
        gradient = np.array([-2 * (1 - a) - 400 * a * (b - a * a), 200 * (b - a * a)])
        return float(value), gradient

    start = np.array([-1.2, 1.0])
    fit = lbfgs.minimize(rosenbrock, start, gradient_tolerance=1e-8, change_tolerance=0)
    np.testing.assert_allclose(fit.x, [1.0, 1.0], atol=1e-6)
    assert fit.iterations < 100


def test_minimum_start_stops_at_once():
    fit = lbfgs.minimize(_quadratic(np.eye(3), np.zeros(3)), np.zeros(3))
    assert (fit.iterations, fit.evaluations) == (0, 1)


def test_iteration_limit_is_kept():
    rng = np.random.default_rng(1)
    basis = rng.standard_normal((30, 30))
    objective = _quadratic(basis @ basis.T, rng.standard_normal(30))
    limited = lbfgs.minimize(objective, np.zeros(30), gradient_tolerance=0.0, max_iterations=5)
    free = lbfgs.minimize(objective, np.zeros(30), gradient_tolerance=0.0, max_iterations=50)
    # Evaluations count too: at most 1.25 times max_iterations, as in torch.optim.LBFGS.
    assert limited.iterations <= 5 < free.iterations


def test_minimum_equals_torch_lbfgs_on_logistic_regression():
    """Same minimum as torch.optim.LBFGS with the strong Wolfe line search."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=generator, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * torch.randn(300, generator=generator, dtype=torch.float64) > 0).double()

    def loss(w):
        return torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y) + 1e-3 * w @ w

    def objective(w):
        weights = torch.from_numpy(w).requires_grad_(True)
        value = loss(weights)
        value.backward()
        return value.item(), weights.grad.numpy().copy()

    fit = lbfgs.minimize(objective, np.zeros(6), gradient_tolerance=1e-9)
    weights = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weights],
        max_iter=500,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=10,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        value = loss(weights)
        value.backward()
        return value

    optimizer.step(closure)
    np.testing.assert_allclose(fit.x, weights.detach().numpy(), atol=1e-8)
    assert fit.value == pytest.approx(loss(weights.detach()).item(), abs=1e-14)


def test_non_finite_trial_point_still_makes_progress():
    """A step into a region where the objective is NaN is shortened, not abandoned."""

    def objective(x):
        if x[0] > 1:
            return float("nan"), np.array([np.nan])
        return float(1e4 * (x[0] - 0.995) ** 2), np.array([2e4 * (x[0] - 0.995)])

    fit = lbfgs.minimize(objective, np.array([0.5]))
    assert fit.x[0] == pytest.approx(0.995, abs=1e-6)


def test_one_iteration_is_run():
    fit = lbfgs.minimize(_quadratic(np.eye(2), np.ones(2)), np.zeros(2), max_iterations=1)
    assert fit.iterations == 1
