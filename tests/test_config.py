import pytest

from glo_search.config import FIELDS, ConfigError, TrainConfig, from_dict


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"class_dim": 0}, r"invalid class_dim=0 \(--class-dim\): must be >= 1"),
        ({"content_dim": -3}, r"invalid content_dim=-3 \(--content-dim\): must be >= 1"),
        ({"noise_std": -0.1}, r"invalid noise_std=-0.1 \(--noise-std\): must be >= 0"),
        ({"content_decay": -1.0}, r"invalid content_decay=-1.0 .*must be >= 0"),
        ({"noise_std": float("nan")}, r"invalid noise_std=nan .*must be a finite number"),
        ({"lr_latent": 0.0}, r"invalid lr_latent=0.0 .*must be > 0"),
        ({"epochs": 0}, r"invalid epochs=0 .*must be >= 1"),
        ({"num_images": 5}, r"invalid num_images=5 .*must be >= 10"),
        ({"eval_every": 0}, r"invalid eval_every=0 \(--eval-every\): must be >= 1"),
        ({"loss": "l3"}, r"invalid loss='l3' \(--loss\): must be one of l1, l2, l1\+l2"),
        ({"generator": "vae"}, r"invalid generator='vae' .*must be one of glo"),
        ({"dataset": "cifar"}, r"invalid dataset='cifar' .*must be one of shipped, mnist"),
        ({"split": "train"}, r"invalid split='train' .*only the test split"),
        ({"dataset": "mnist"}, r"invalid data_root='' .*must name a folder"),
    ],
)
def test_config_rejects_bad_value(values, expected):
    with pytest.raises(ConfigError, match=expected):
        from_dict(values)


def test_config_error_is_one_line():
    with pytest.raises(ConfigError) as error:
        from_dict({"loss": "l3"})
    assert "\n" not in str(error.value)


def test_from_dict_unknown_key_lists_valid_keys():
    with pytest.raises(
        ConfigError, match="unknown config key 'class_size'; valid keys: class_dim"
    ):
        from_dict({"class_size": 5})


@pytest.mark.parametrize(
    ("name", "value", "rule"),
    [
        ("class_dim", 2.5, "must be an integer"),
        ("class_dim", "5", "must be an integer"),
        ("class_dim", True, "must be an integer"),
        ("noise_std", "0.3", "must be a number"),
        ("download", 1, "must be true or false"),
        ("loss", 1, "must be a string"),
    ],
)
def test_from_dict_rejects_wrong_type(name, value, rule):
    with pytest.raises(ConfigError, match=rule):
        from_dict({name: value})


def test_from_dict_converts_numpy_and_whole_floats():
    import numpy as np

    config = from_dict({"class_dim": np.int64(7), "content_dim": 12.0, "noise_std": np.float32(2)})
    assert config.class_dim == 7
    assert type(config.class_dim) is int
    assert config.content_dim == 12
    assert type(config.noise_std) is float


def test_defaults_are_the_reference_setting():
    config = TrainConfig()
    assert (config.class_dim, config.content_dim, config.noise_std) == (5, 25, 0.3)
    assert config.loss == "l1+l2"
    assert config.num_images == 2000


def test_every_field_has_help():
    assert all(field.metadata["help"] for field in FIELDS.values())


def test_replace_validates():
    with pytest.raises(ConfigError, match="class_dim=0"):
        TrainConfig().replace(class_dim=0)
