"""Limited-memory BFGS with a strong Wolfe line search, on NumPy float64 vectors.

content_leakage fits its logistic-regression probe with it. The steps follow Nocedal and
Wright, Numerical Optimization (2nd ed.): Algorithm 7.4 (the two-loop recursion) for the
direction, and Algorithms 3.5 and 3.6 (bracketing, then zooming in by cubic
interpolation) for the step length. torch.optim.LBFGS runs the same algorithms, but each
of its iterations takes about 45 PyTorch operations on small tensors. On 1,600 codes of
128 features (one core of a 2-core AMD EPYC VM) they took 1.4 ms of its 2.6 ms per
iteration, where the NumPy operations here take 0.5-0.7 ms.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# An objective maps x to (value, gradient), both float64, with a new gradient array each call.
Objective = Callable[[np.ndarray], tuple[float, np.ndarray]]

SUFFICIENT_DECREASE = 1e-4  # c1 of the Wolfe conditions
CURVATURE = 0.9  # c2, the usual value for quasi-Newton directions
LINE_SEARCH_EVALUATIONS = 25  # evaluations one line search may take
MIN_CURVATURE = 1e-10  # pairs (s, y) with s.y at or below it are left out of the history


@dataclass(frozen=True)
class Result:
    x: np.ndarray
    value: float
    iterations: int
    evaluations: int


@dataclass(frozen=True)
class _Point:
    """One evaluation along the search line: step t, value, slope, position, gradient."""

    t: float
    value: float
    slope: float
    x: np.ndarray
    gradient: np.ndarray


def minimize(
    objective: Objective,
    x0: np.ndarray,
    *,
    gradient_tolerance: float = 1e-5,
    change_tolerance: float = 1e-12,
    max_iterations: int = 500,
    history_size: int = 10,
) -> Result:
    """Minimize a smooth function from x0.

    Stops when no gradient entry exceeds ``gradient_tolerance``, when a step moves no entry
    of x or changes the value by more than ``change_tolerance``, after ``max_iterations``
    iterations, or after the iteration in which the evaluations reach 1.25 times that.
    """
    x = np.array(x0, dtype=np.float64)
    value, gradient = objective(x)
    evaluations = 1
    history: deque[tuple[np.ndarray, np.ndarray, float]] = deque(maxlen=history_size)
    iterations = 0
    while np.abs(gradient).max() > gradient_tolerance and iterations < max_iterations:
        iterations += 1
        direction = _direction(gradient, history)
        slope = float(gradient @ direction)
        if slope > -change_tolerance:
            break  # no descent left along the direction, to rounding
        # Without curvature pairs the direction is -gradient, whose length can be far from
        # the minimum's distance: the first step is then at most 1 in the 1-norm.
        first_step = 1.0 if history else min(1.0, 1.0 / np.abs(gradient).sum())
        start = _Point(0.0, value, slope, x, gradient)
        point, used = _line_search(objective, start, direction, first_step, change_tolerance)
        evaluations += used
        s = point.x - x
        y = point.gradient - gradient
        curvature = float(s @ y)
        if curvature > MIN_CURVATURE:
            history.append((s, y, 1.0 / curvature))
        change = abs(point.value - value)
        x, value, gradient = point.x, point.value, point.gradient
        if np.abs(s).max() <= change_tolerance or change < change_tolerance:
            break
        if evaluations >= 1.25 * max_iterations:
            break
    return Result(x, value, iterations, evaluations)


def _direction(gradient: np.ndarray, history: deque) -> np.ndarray:
    """Return -H gradient, H the inverse-Hessian estimate of the stored pairs."""
    q = -gradient
    if not history:
        return q
    alphas = []
    for s, y, rho in reversed(history):
        alpha = rho * float(s @ q)
        q = q - alpha * y
        alphas.append(alpha)
    s, y, _ = history[-1]
    q = q * (float(s @ y) / float(y @ y))  # initial estimate gamma * I
    for (s, y, rho), alpha in zip(history, reversed(alphas), strict=True):
        beta = rho * float(y @ q)
        q = q + (alpha - beta) * s
    return q


def _evaluate(objective: Objective, start: _Point, direction: np.ndarray, t: float) -> _Point:
    x = start.x + t * direction
    value, gradient = objective(x)
    return _Point(t, value, float(gradient @ direction), x, gradient)


def _line_search(
    objective: Objective,
    start: _Point,
    direction: np.ndarray,
    t: float,
    change_tolerance: float,
) -> tuple[_Point, int]:
    """Return a point along direction that meets the strong Wolfe conditions, or the best
    one found within LINE_SEARCH_EVALUATIONS evaluations, and the evaluations taken."""
    previous = start
    for used in range(1, LINE_SEARCH_EVALUATIONS + 1):
        point = _evaluate(objective, start, direction, t)
        if not _decreases(point, start) or (used > 1 and point.value >= previous.value):
            return _zoom(objective, start, direction, previous, point, used, change_tolerance)
        if abs(point.slope) <= -CURVATURE * start.slope:
            return point, used
        if point.slope >= 0:
            return _zoom(objective, start, direction, point, previous, used, change_tolerance)
        # Still descending: extrapolate, at least 1.01 and at most 10 times as far.
        low, high = t + 0.01 * (t - previous.t), 10 * t
        previous, t = point, _cubic_minimum(previous, point, low, high)
    return previous, LINE_SEARCH_EVALUATIONS


def _zoom(
    objective: Objective,
    start: _Point,
    direction: np.ndarray,
    low: _Point,
    high: _Point,
    used: int,
    change_tolerance: float,
) -> tuple[_Point, int]:
    """Narrow [low, high] (low: the lowest value that decreases enough) to a Wolfe point."""
    scale = np.abs(direction).max()
    while used < LINE_SEARCH_EVALUATIONS and abs(high.t - low.t) * scale >= change_tolerance:
        left, right = min(low.t, high.t), max(low.t, high.t)
        margin = 0.1 * (right - left)  # keep trial steps off the interval's ends
        t = _cubic_minimum(low, high, left + margin, right - margin)
        point = _evaluate(objective, start, direction, t)
        used += 1
        if not _decreases(point, start) or point.value >= low.value:
            high = point
            continue
        if abs(point.slope) <= -CURVATURE * start.slope:
            return point, used
        if point.slope * (high.t - low.t) >= 0:
            high = low
        low = point
    return low, used


def _decreases(point: _Point, start: _Point) -> bool:
    """Return whether point meets the sufficient-decrease (Armijo) condition."""
    return point.value <= start.value + SUFFICIENT_DECREASE * point.t * start.slope


def _cubic_minimum(a: _Point, b: _Point, low: float, high: float) -> float:
    """Return the minimizer of the cubic that matches the values and slopes at a and b,
    within [low, high]; the interval's middle when the cubic has no minimum."""
    if a.t == b.t or not np.isfinite([a.value, a.slope, b.value, b.slope]).all():
        return (low + high) / 2
    d1 = a.slope + b.slope - 3 * (a.value - b.value) / (a.t - b.t)
    square = d1 * d1 - a.slope * b.slope
    if square < 0:
        return (low + high) / 2
    d2 = np.copysign(np.sqrt(square), b.t - a.t)
    denominator = b.slope - a.slope + 2 * d2
    if denominator == 0:
        return (low + high) / 2
    t = b.t - (b.t - a.t) * (b.slope + d2 - d1) / denominator
    if not np.isfinite(t):  # a value or slope that overflowed, or NaN
        return (low + high) / 2
    return float(min(max(t, low), high))
