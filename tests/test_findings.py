import pandas as pd
import pytest
import torch

from glo_search import findings as f
from glo_search.study import count_distinct, seed_summary


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([0.9, 0.91, 0.89], [0.5, 0.52, 0.49], f.HOLDS),
        ([0.5, 0.52, 0.49], [0.9, 0.91, 0.89], f.FAILS),
        ([0.5, 0.9, 0.1], [0.45, 0.85, 0.05], f.UNCLEAR),
        ([0.5], [], f.UNCLEAR),
    ],
)
def test_compare_over_seeds(a, b, expected):
    assert f.compare(pd.Series(a, dtype=float), pd.Series(b, dtype=float)) == expected


@pytest.mark.parametrize(
    ("verdicts", "expected"),
    [
        ([f.HOLDS, f.HOLDS], f.HOLDS),
        ([f.HOLDS, f.UNCLEAR], f.UNCLEAR),
        ([f.UNCLEAR, f.FAILS], f.FAILS),
        ([], f.UNCLEAR),
    ],
)
def test_combine_verdicts(verdicts, expected):
    assert f.combine(verdicts) == expected


def _class_dim_data(best_of_five: float) -> f.StudyData:
    rows = []
    for class_dim, level in ((5, best_of_five), (10, 0.5), (25, 0.3)):
        for seed, jitter in enumerate((-0.01, 0.0, 0.01)):
            rows.append(
                {"class_dim": class_dim, "seed": seed, "at_best_disentanglement": level + jitter}
            )
    trials = pd.DataFrame(rows)
    for column in (
        "at_best_class_fidelity",
        "at_best_style_transfer",
        "at_best_ideal_neighbour_accuracy",
    ):
        trials[column] = 0.5
    return f.StudyData("class_dim", trials, pd.DataFrame())


@pytest.mark.parametrize(
    ("best_of_five", "expected"), [(0.8, f.HOLDS), (0.51, f.UNCLEAR), (0.2, f.FAILS)]
)
def test_claim_class_dim_verdicts(best_of_five, expected):
    finding = f.claim_class_dim(_class_dim_data(best_of_five))
    assert finding.verdict == expected
    caption, table = finding.tables[0]
    assert table["class_dim"].tolist() == [5, 10, 25]
    assert table["seeds"].tolist() == [3, 3, 3]


def test_markdown_table_renders_rows():
    table = pd.DataFrame({"claim": ["1. x"], "value": [0.12345]})
    assert f.markdown_table(table) == "| claim | value |\n| --- | --- |\n| 1. x | 0.123 |"


def test_seed_summary_mean_and_spread():
    mean, spread, count = seed_summary(pd.Series([1.0, 2.0, 3.0]))
    assert mean == 2.0
    assert spread == 1.0
    assert count == 3


def test_count_distinct_groups_identical_images():
    images = torch.zeros(20, 1, 28, 28)
    images[10:] = 1.0
    assert count_distinct(images) == 2


def test_count_distinct_separates_different_images():
    images = torch.rand(30, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert count_distinct(images) == 30
