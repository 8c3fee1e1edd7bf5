"""Config composition, command-line style overrides and validation messages that name the key."""
import pytest
from ml_collections import config_flags  # noqa: F401  (the CLI's parser)

from instructgpt_jax import configs
from instructgpt_jax.errors import ConfigError


def test_parse_arg_types_and_unknown_keys():
    a = configs.parse_arg("size=small,steps=7", size="tiny", steps=0)
    assert a.size == "small" and a.steps == 7
    with pytest.raises(ConfigError, match="sise"):
        configs.parse_arg("sise=small", size="tiny")


def test_unknown_size_names_the_key():
    with pytest.raises(ConfigError, match="size"):
        configs.model_config("huge")


def test_d_model_not_divisible_by_heads_names_the_keys():
    c = configs.base_config("pretrain", "test")
    c.model.n_heads = 3
    with pytest.raises(ConfigError, match=r"model\.d_model=64 is not divisible by model\.n_heads=3"):
        configs.validate(c)


@pytest.mark.parametrize("mesh,match", [
    ((3, 1, 1), "does not fit 8 devices"),
    ((2, 2, 1), "uses 4 devices but 8"),
    ((-1, -1, 1), "at most one"),
    ((1, 1, 8), r"n_heads=4 is not divisible by mesh\.tensor=8"),
])
def test_mesh_that_does_not_match_the_devices(mesh, match):
    c = configs.base_config("pretrain", "test")
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    with pytest.raises(ConfigError, match=match):
        configs.validate(c, num_devices=8)


def test_mesh_fill_and_batch_divisibility():
    c = configs.base_config("pretrain", "test")
    c.mesh.fsdp, c.mesh.tensor = 2, 2
    assert configs.validate_mesh(c, 8) == (2, 2, 2)
    c.train.batch_size = 6
    with pytest.raises(ConfigError, match="train.batch_size=6"):
        configs.validate_mesh(c, 8)


def test_other_impossible_values():
    for key, value, match in [("train.seq_len", 999, "exceeds model.max_len"), ("model.dtype", "int8", "model.dtype"),
                              ("model.resid_dropout", 1.5, "model.resid_dropout"), ("optim.nonfinite", "ignore", "optim.nonfinite")]:
        c = configs.base_config("pretrain", "test")
        section, name = key.split(".")
        c[section][name] = value
        with pytest.raises(ConfigError, match=match):
            configs.validate(c)


def test_ppo_value_lr_override_leaves_the_policy_lr_alone():
    c = configs.experiment_config("ppo", "size=test,variant=ppo")
    policy_lr = c.optim.lr
    assert c.value_optim.lr == policy_lr  # the default: the same value (tiny sets its own, 5e-4)
    c.value_optim.lr = 10 * policy_lr
    assert c.optim.lr == policy_lr and c.value_optim.lr == 10 * policy_lr
