import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from ray import tune

import search_spaces
from glo_search.config import ConfigError, TrainConfig
from glo_search.spaces import config_keys, resolve

BASE = TrainConfig()


def test_named_spaces_include_default_and_report():
    assert {"default", "report"} <= set(search_spaces.names())


def test_default_space_varies_the_four_hyperparameters():
    space = resolve("default", BASE)
    assert space.kind == "define_by_run"
    assert space.keys == {"class_dim", "content_dim", "noise_std", "content_decay"}


def test_default_space_has_zero_decay_branch():
    import optuna

    space = resolve("default", BASE).space
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    decays = set()
    for _ in range(40):
        trial = study.ask()
        constants = space(trial) or {}
        decays.add(config_keys({**trial.params, **constants})["content_decay"] == 0.0)
    assert decays == {True, False}


def test_report_space_is_the_study_grid():
    space = resolve("report", BASE)
    assert space.kind == "optuna"
    assert space.space["class_dim"].choices == (5, 10, 15, 25, 50)
    assert space.space["content_dim"].choices == (10, 25, 50, 75, 100)
    assert space.space["noise_std"].choices == (0.0001, 0.3, 5.0, 10.0, 100.0)
    assert space.space["content_decay"].choices == (0.0, 0.1, 0.5, 1.0)


def test_unknown_space_name_lists_valid_names():
    with pytest.raises(ConfigError, match="unknown search space 'nope'; valid spaces: default"):
        resolve("nope", BASE)


def test_space_from_file(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(
        "from optuna.distributions import IntDistribution\n"
        "SPACE = {'class_dim': IntDistribution(2, 4)}\n"
    )
    space = resolve(str(path), BASE)
    assert space.name == "tiny"
    assert space.keys == {"class_dim"}


def test_edited_space_file_is_checked_again(tmp_path):
    path = tmp_path / "grown.py"
    path.write_text("def SPACE(trial):\n    trial.suggest_int('class_dim', 2, 4)\n")
    assert resolve(str(path), BASE).keys == {"class_dim"}
    path.write_text("def SPACE(trial):\n    trial.suggest_int('class_dim', 0, 4)\n")
    with pytest.raises(ConfigError, match="invalid class_dim=0"):
        resolve(str(path), BASE)


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"noise_std": FloatDistribution(-1.0, 1.0)}, "can produce invalid noise_std=-1.0"),
        ({"loss": CategoricalDistribution(["l1", "huber"])}, "invalid loss='huber'"),
        ({"class_size": CategoricalDistribution([5])}, "unknown key 'class_size'"),
        ({"epochs": CategoricalDistribution([5, 10])}, "varies 'epochs'"),
        ({"class_dim": tune.randint(0, 8)}, "invalid class_dim=0"),
        ({"content_decay": tune.choice([0.0, -0.5])}, "invalid content_decay=-0.5"),
        ({"class_dim": tune.randint(1, 8), "noise_std": FloatDistribution(0, 1)}, "mixes"),
        ({}, "non-empty dict"),
    ],
)
def test_bad_dict_space_rejected(space, message):
    with pytest.raises(ConfigError, match=message):
        resolve(space, BASE)


def test_bad_define_by_run_branch_rejected():
    def space(trial):
        if trial.suggest_categorical("_wide", [False, True]):
            trial.suggest_int("content_dim", 0, 4)
        return None

    with pytest.raises(ConfigError, match="invalid content_dim=0"):
        resolve(space, BASE)


def test_equal_but_different_choices_both_checked():
    """(1, 0.5, ...) == (True, 0.5, ...) in Python, yet True is not a valid noise_std.

    The second list is used in one draw only, which seldom draws True itself, so only a
    check of every choice of that list finds it.
    """
    rest = tuple(0.5 + k / 100 for k in range(40))

    def space(trial):
        first = 1 if trial.number != 1 else True
        trial.suggest_categorical("noise_std", (first, *rest))

    with pytest.raises(ConfigError, match="noise_std=True"):
        resolve(space, TrainConfig())


def test_define_by_run_returning_bad_type_rejected():
    with pytest.raises(ConfigError, match="returned list"):
        resolve(lambda trial: [1], BASE)


def test_define_by_run_raising_is_reported():
    def space(trial):
        raise KeyError("oops")

    with pytest.raises(ConfigError, match="raised KeyError"):
        resolve(space, BASE)


def test_ray_space_constants_and_domains_accepted():
    space = resolve({"class_dim": tune.choice([5, 10]), "loss": "l1"}, BASE)
    assert space.kind == "ray"
    assert space.keys == {"class_dim", "loss"}
