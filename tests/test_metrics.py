import math

import numpy as np
import pytest
import torch
from plain_metrics import plain_style_attributes

from glo_search import metrics as m
from glo_search import native


def test_nearest_classes_known_layout():
    # Codes on a line at 0, 1, 3, 7, 15: each one's nearest is its left neighbour,
    # except the first, whose nearest is the second.
    codes = torch.tensor([[0.0], [1.0], [3.0], [7.0], [15.0]])
    assert m.nearest_classes(codes) == [1, 0, 1, 2, 3]


def test_nearest_classes_euclidean_in_several_dims():
    codes = torch.zeros(10, 3)
    for k in range(10):
        codes[k] = torch.tensor([10.0 * k, 0.0, 0.0])
    codes[4] = codes[1] + torch.tensor([0.0, 0.5, 0.5])  # 4 sits beside 1
    nearest = m.nearest_classes(codes)
    assert nearest[1] == 4
    assert nearest[4] == 1
    assert nearest[0] == 1


def test_nearest_classes_rejects_one_class():
    with pytest.raises(ValueError, match="num_classes >= 2"):
        m.nearest_classes(torch.zeros(1, 4))


def test_ideal_neighbour_accuracy_default_table():
    perfect = [3, 4, 3, 0, 1, 2, 8, 1, 0, 3]
    assert m.ideal_neighbour_accuracy(perfect) == 1.0
    wrong = [1, 0, 0, 1, 0, 0, 0, 0, 1, 0]
    assert m.ideal_neighbour_accuracy(wrong) == 0.0
    half = perfect[:5] + wrong[5:]
    assert m.ideal_neighbour_accuracy(half) == 0.5


def test_ideal_neighbour_accuracy_custom_table():
    ideal = {0: [1], 1: [2], 2: [0]}
    assert m.ideal_neighbour_accuracy([1, 2, 1], ideal=ideal) == pytest.approx(2 / 3)


def test_ideal_neighbour_accuracy_from_placed_codes():
    # Place each class code right beside one of its ideal neighbours.
    pairs = {0: 8, 8: 0, 1: 7, 7: 1, 2: 5, 5: 2, 3: 9, 9: 3, 4: 6, 6: 4}
    codes = torch.zeros(10, 2)
    for slot, (a, b) in enumerate([(0, 8), (1, 7), (2, 5), (3, 9), (4, 6)]):
        codes[a] = torch.tensor([100.0 * slot, 0.0])
        codes[b] = torch.tensor([100.0 * slot, 1.0])
    nearest = m.nearest_classes(codes)
    assert nearest == [pairs[k] for k in range(10)]
    # 4-6 and 6-4 are not ideal pairs (6's ideal set is 3 8 9); 9-3 and 3-9 are half right.
    hits = [k for k in range(10) if nearest[k] in m.IDEAL_NEIGHBOURS[k]]
    assert hits == [0, 1, 2, 5, 7, 8, 9]
    assert m.ideal_neighbour_accuracy(nearest) == 0.7


def _stroke(width: int, slant: int = 0) -> torch.Tensor:
    """A vertical bar of the given width, sheared by slant pixels over its height."""
    image = torch.zeros(1, 28, 28)
    for row in range(4, 24):
        shift = round(slant * (row - 14) / 10)
        start = 12 + shift
        image[0, row, start : start + width] = 1.0
    return image


def test_style_attributes_thickness_orders_strokes():
    images = torch.stack([_stroke(1), _stroke(3), _stroke(6)])
    thickness = m.style_attributes(images)[:, 0]
    assert thickness[0] < thickness[1] < thickness[2]
    assert thickness[1] == pytest.approx(3.0, rel=0.35)


def test_style_attributes_slant_sign():
    images = torch.stack([_stroke(2, slant=-4), _stroke(2), _stroke(2, slant=4)])
    slant = m.style_attributes(images)[:, 1]
    assert slant[0] < -0.1
    assert abs(slant[1]) < 0.05
    assert slant[2] > 0.1


def _assert_style_matches_plain(images: torch.Tensor) -> None:
    fast = m.style_attributes(images)
    plain = plain_style_attributes(images)
    for j, name in enumerate(m.STYLE_ATTRIBUTES):
        # A few units in the last place of float32. Slant near 0 needs the absolute bound.
        torch.testing.assert_close(fast[:, j], plain[:, j], rtol=3e-7, atol=1e-6, msg=name)


@pytest.fixture(params=["C kernel", "PyTorch"])
def style_path(request, monkeypatch):
    """Runs a test with the C kernel for style attributes, then without it."""
    if request.param == "PyTorch":
        monkeypatch.setattr(m, "_native_style_sums", lambda x: None)
    elif native.kernels() is None:
        pytest.skip("the C kernels could not be built here")
    return request.param


def test_style_attributes_match_plain_on_digits(small_dataset, style_path):
    from glo_search.config import TrainConfig
    from glo_search.trainer import Trainer

    trainer = Trainer(TrainConfig(num_images=200, swap_sources=50), small_dataset, device="cpu")
    trainer.train_epoch()
    generated = trainer.reconstruct()  # (200, 1, 28, 28) sigmoid outputs
    _assert_style_matches_plain(torch.cat([small_dataset.images, generated]))


def test_style_attributes_match_plain_on_other_images(style_path):
    generator = torch.Generator().manual_seed(0)
    cases = {
        "uniform noise, not square": torch.rand(30, 1, 20, 33, generator=generator),
        "sparse ink": (torch.rand(30, 1, 28, 28, generator=generator) > 0.97).float(),
        "blank": torch.zeros(3, 1, 28, 28),
        "strokes": torch.stack([_stroke(w, s) for w in (1, 3, 6) for s in (-4, 0, 4)]),
    }
    for name, images in cases.items():
        fast = m.style_attributes(images)
        assert fast.shape == (len(images), 3), name
        _assert_style_matches_plain(images)


def test_style_kernel_matches_float64():
    if native.kernels() is None:
        pytest.skip("the C kernels could not be built here")
    images = torch.rand(40, 1, 20, 33, generator=torch.Generator().manual_seed(1)) ** 3
    sums = m._native_style_sums(images[:, 0])
    assert sums is not None
    x = images[:, 0].double()
    ys = torch.arange(20, dtype=x.dtype).view(1, -1, 1)
    xs = torch.arange(33, dtype=x.dtype).view(1, 1, -1)
    mass = x.sum(dim=(1, 2))
    dx = xs - ((x * xs).sum(dim=(1, 2)) / mass).view(-1, 1, 1)
    dy = ys - ((x * ys).sum(dim=(1, 2)) / mass).view(-1, 1, 1)
    padded = torch.nn.functional.pad(x, (0, 1, 0, 1))
    grad_x = padded[:, :-1, 1:] - padded[:, :-1, :-1]
    grad_y = padded[:, 1:, :-1] - padded[:, :-1, :-1]
    expected = {
        "mass": mass,
        "mu20": (x * dx * dx).sum(dim=(1, 2)),
        "mu02": (x * dy * dy).sum(dim=(1, 2)),
        "mu11": (x * dx * dy).sum(dim=(1, 2)),
        "perimeter": torch.sqrt(grad_x**2 + grad_y**2).sum(dim=(1, 2)),
    }
    for j, (name, want) in enumerate(expected.items()):
        torch.testing.assert_close(sums[:, j], want, rtol=1e-12, atol=1e-9, msg=name)


def test_wide_images_skip_style_kernel():
    wide = torch.rand(
        2, 1, 1, m.STYLE_KERNEL_MAX_SIDES, generator=torch.Generator().manual_seed(2)
    )
    assert m._native_style_sums(wide[:, 0]) is None
    _assert_style_matches_plain(wide)


def test_style_attributes_of_no_images():
    assert m.style_attributes(torch.zeros(0, 1, 28, 28)).shape == (0, 3)


def _swap_data(num_sources: int = 60):
    torch.manual_seed(0)
    labels = torch.arange(num_sources) % 10
    swaps = m.build_swaps(labels, num_sources, seed=0)
    widths = torch.randint(1, 7, (num_sources,))
    sources = torch.stack([_stroke(int(w)) for w in widths])
    return labels, swaps, sources


def test_style_transfer_content_ignoring_generator_is_zero():
    labels, swaps, sources = _swap_data()
    # The output depends on the target class only.
    outputs = torch.stack([_stroke(int(t) % 5 + 1) for t in swaps.targets])
    score = m.style_transfer(
        m.style_attributes(sources[swaps.sources]), m.style_attributes(outputs), swaps.targets
    )
    assert score == pytest.approx(0.0, abs=1e-6)


def test_style_transfer_faithful_generator_is_high():
    labels, swaps, sources = _swap_data()
    # The output copies the content's stroke and slant exactly.
    outputs = sources[swaps.sources]
    attributes = m.style_attributes(outputs)
    score = m.style_transfer(attributes, attributes, swaps.targets)
    # Width and thickness correlate perfectly; slant is constant (0), which counts as 0.
    assert score == pytest.approx(2 / 3, abs=1e-6)


def test_build_swaps_never_targets_own_label():
    labels = torch.arange(200) % 10
    swaps = m.build_swaps(labels, 50, seed=3)
    assert len(swaps.sources) == 50 * 9
    assert (labels[swaps.sources] != swaps.targets).all()


def test_build_swaps_seeded():
    labels = torch.arange(200) % 10
    first = m.build_swaps(labels, 50, seed=3)
    second = m.build_swaps(labels, 50, seed=3)
    assert torch.equal(first.sources, second.sources)


def test_class_fidelity_share_of_matches():
    predicted = torch.tensor([1, 2, 3, 0])
    targets = torch.tensor([1, 2, 0, 0])
    assert m.class_fidelity(predicted, targets) == 0.75


def test_content_leakage_label_codes_are_found():
    labels = torch.arange(1000) % 10
    codes = torch.nn.functional.one_hot(labels, 10).float() + 0.01 * torch.randn(1000, 10)
    assert m.content_leakage(codes, labels, seed=0) > 0.95


def test_content_leakage_random_codes_near_chance():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(1000) % 10
    codes = torch.randn(1000, 16, generator=generator)
    assert m.content_leakage(codes, labels, seed=0) < 0.2


def test_content_leakage_nan_codes():
    labels = torch.arange(100) % 10
    codes = torch.full((100, 4), float("nan"))
    assert math.isnan(m.content_leakage(codes, labels, seed=0))


def test_metric_mode_unknown_metric_lists_valid():
    with pytest.raises(ValueError, match="unknown metric 'accuracy'; valid metrics: recon_error"):
        m.metric_mode("accuracy")


def test_every_metric_worst_is_in_range():
    for spec in m.METRICS.values():
        assert spec.worst in (0.0, 1.0)


def test_probe_split_matches_scikit_learn():
    from sklearn.model_selection import train_test_split

    for count, seed in ((2000, 0), (333, 7)):
        train, test = m.probe_split(count, seed)
        expected_train, expected_test = train_test_split(
            list(range(count)), test_size=0.2, random_state=seed
        )
        assert train.tolist() == expected_train
        assert test.tolist() == expected_test


def _sklearn_leakage(codes, labels, seed):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x_train, x_test, y_train, y_test = train_test_split(
        codes.double().numpy(), labels.numpy(), test_size=0.2, random_state=seed
    )
    scaler = StandardScaler().fit(x_train)
    probe = LogisticRegression(max_iter=1000).fit(scaler.transform(x_train), y_train)
    return probe.score(scaler.transform(x_test), y_test)


@pytest.mark.parametrize("signal", [0.0, 0.3, 1.0])
def test_content_leakage_agrees_with_scikit_learn(signal):
    # Codes that carry the label with a given strength, among noise dimensions.
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 10, (2000,), generator=generator)
    codes = torch.randn(2000, 25, generator=generator)
    codes[:, :10] += signal * torch.nn.functional.one_hot(labels, 10)
    ours = m.content_leakage(codes, labels, seed=0)
    # 400 held-out codes: a difference of 2 codes is 0.005.
    assert ours == pytest.approx(_sklearn_leakage(codes, labels, 0), abs=0.0051)


def test_content_leakage_constant_feature_is_not_scaled():
    labels = torch.arange(500) % 10
    codes = torch.nn.functional.one_hot(labels, 10).double()
    codes = torch.cat([codes, torch.ones(500, 1, dtype=torch.float64)], dim=1)
    assert m.content_leakage(codes, labels, seed=0) == 1.0


def _probe_inputs(rows, features, classes, seed):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (rows,), generator=generator)
    x = torch.randn(rows, features, generator=generator, dtype=torch.float64)
    x[:, : min(features, classes)] += torch.nn.functional.one_hot(labels, classes)[
        :, :features
    ].double()
    design = np.concatenate([x.numpy(), np.ones((rows, 1))], axis=1)
    weights = 0.3 * torch.randn(features + 1, classes, generator=generator, dtype=torch.float64)
    return design, labels.numpy().astype(np.int64), weights.numpy().reshape(-1)


@pytest.mark.parametrize(
    "rows, features, classes", [(1600, 128, 10), (401, 7, 3), (5, 2, 16), (1, 1, 2)]
)
def test_probe_kernel_equals_the_numpy_objective(rows, features, classes):
    lib = native.kernels()
    if lib is None:
        pytest.skip("no C kernels here")
    design, labels, weights = _probe_inputs(rows, features, classes, seed=rows)
    shape = (features + 1, classes)
    penalty = 1.0 / (2.0 * rows)
    value, gradient = m._native_objective(lib, design, labels, shape, penalty)(weights)
    want_value, want_gradient = m._numpy_objective(design, labels, shape, penalty)(weights)
    assert value == pytest.approx(want_value, rel=1e-13)
    np.testing.assert_allclose(gradient, want_gradient, rtol=0, atol=1e-15)


def test_probe_fits_equal_with_and_without_kernels(monkeypatch):
    """The two objectives differ by rounding only: the fits agree closely, the accuracy exactly."""
    generator = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 10, (2000,), generator=generator)
    codes = torch.randn(2000, 40, generator=generator)
    codes[:, :10] += 0.4 * torch.nn.functional.one_hot(labels, 10)
    x = (codes.double() - codes.double().mean(0)) / codes.double().std(0)
    with_kernels = m.fit_logistic_regression(x, labels, 10)
    leakage = m.content_leakage(codes, labels, seed=0)
    monkeypatch.setattr(m.native, "kernels", lambda: None)
    without = m.fit_logistic_regression(x, labels, 10)
    assert (with_kernels - without).abs().max().item() < 1e-6
    assert m.content_leakage(codes, labels, seed=0) == leakage


@pytest.mark.parametrize("bad", [-1, 10, 10**6])
def test_probe_rejects_labels_outside_the_classes(bad):
    x = torch.randn(20, 3, dtype=torch.float64)
    labels = torch.cat([torch.arange(19) % 10, torch.tensor([bad])])
    with pytest.raises(ValueError, match=rf"invalid labels: .*{bad}.* in \[0, 10\)"):
        m.fit_logistic_regression(x, labels, 10)
