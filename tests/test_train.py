"""Sharded pretraining step (1 device vs 8 fake devices), optimizer, non-finite guard, checkpoints."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from instructgpt_jax import configs
from instructgpt_jax.train import checkpoint, sharding, steps
from instructgpt_jax.train.state import learning_rate_schedule, make_optimizer


def build(mesh_shape, n_devices, **optim):
    c = configs.base_config("pretrain", "test")
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh_shape
    c.optim.update(optim)
    mesh = sharding.make_mesh(c, jax.devices()[:n_devices])
    model = steps.build_model(c)
    init = steps.init_state_fn(model, make_optimizer(c.optim), c.train.seq_len)
    state, shardings = sharding.sharded_init(init, mesh, sharding.rules(c), jax.random.PRNGKey(0))
    return c, mesh, model, init, state, shardings


def tokens(seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), (8, 65), 0, 512)


def run_steps(mesh_shape, n_devices, n=2):
    c, mesh, model, _, state, shardings = build(mesh_shape, n_devices)
    step = steps.make_pretrain_step(c, model, mesh, shardings)
    for i in range(n):
        state, metrics = step(state, {"tokens": tokens(i)})
    return float(metrics["loss"]), jax.device_get(state.params), state


@pytest.fixture(scope="module")
def single_device():
    return run_steps((1, 1, 1), 1)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_step_equals_single_device(single_device, mesh_shape):
    loss1, params1, _ = single_device
    loss8, params8, state8 = run_steps(mesh_shape, 8)
    assert loss8 == pytest.approx(loss1, abs=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params1, params8)
    spec = state8.params["h_0"]["mlp"]["fc"]["kernel"].sharding.spec
    assert tuple(spec) == ("fsdp", "tensor")  # embed -> fsdp, mlp -> tensor


def test_loss_falls_on_a_repeated_batch():
    c, mesh, model, _, state, shardings = build((1, 1, 1), 1, warmup_steps=0, lr=3e-3)
    step = steps.make_pretrain_step(c, model, mesh, shardings)
    losses = []
    for _ in range(15):
        state, m = step(state, {"tokens": tokens()})
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 1.0
    assert np.log(512) == pytest.approx(losses[0], abs=0.3)  # starts near uniform


def test_schedule_is_warmup_then_cosine_to_ten_percent():
    c = configs.optim_config(lr=1e-3, total_steps=100, warmup_steps=10)
    s = learning_rate_schedule(c)
    assert float(s(0)) == 0.0 and float(s(10)) == pytest.approx(1e-3)
    assert float(s(55)) == pytest.approx(0.55e-3, rel=0.01)  # halfway through the cosine: (1 + 0.1) / 2
    assert float(s(100)) == pytest.approx(1e-4) and float(s(500)) == pytest.approx(1e-4)


def test_adamw_matches_gpt3_hyperparameters():
    c = configs.optim_config(lr=1e-3, total_steps=10, warmup_steps=0)
    assert (c.b1, c.b2, c.eps, c.weight_decay, c.grad_clip) == (0.9, 0.95, 1e-8, 0.1, 1.0)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    tx = make_optimizer(c)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    assert float(updates["w"][0, 0]) == pytest.approx(-1e-3 * 0.1)  # decoupled weight decay on matrices
    assert float(updates["b"][0]) == 0.0  # no decay on biases / gains


def test_nonfinite_gradient_skips_the_update():
    c, mesh, model, _, state, shardings = build((1, 1, 1), 1)

    def nan_loss(params, batch, rng):
        return jnp.sum(params["wte"]["embedding"]) * jnp.nan, {}

    step = steps.make_update_step(nan_loss, c, mesh, shardings, {"tokens": sharding.batch_sharding(mesh)})
    before = jax.device_get(state.params)
    state, m = step(state, {"tokens": tokens()})
    assert float(m["nonfinite"]) == 1.0 and int(state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(state.params))


def test_checkpoint_round_trip_keeps_values_and_shardings(tmp_path):
    c, mesh, model, init, state, shardings = build((2, 2, 2), 8)
    ck = checkpoint.Checkpointer(str(tmp_path), keep=2)
    ck.save(3, state, {"position": 42})
    ck.wait()
    abstract, _ = sharding.abstract_init(init, mesh, sharding.rules(c), jax.random.PRNGKey(0))
    restored, data_state = ck.restore(abstract)
    assert data_state == {"position": 42} and ck.latest_step() == 3
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(restored))
    assert restored.params["wte"]["embedding"].sharding == state.params["wte"]["embedding"].sharding
    params = checkpoint.load_params(str(tmp_path), abstract.params)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), jax.device_get(params))
    ck.close()


def test_restoring_a_checkpoint_of_another_shape_names_the_directory(tmp_path):
    from instructgpt_jax.errors import CheckpointError

    c, mesh, model, init, state, _ = build((1, 1, 1), 1)
    ck = checkpoint.Checkpointer(str(tmp_path))
    ck.save(1, state)
    ck.close()
    c.model.d_model = 128
    other = steps.init_state_fn(steps.build_model(c), make_optimizer(c.optim), c.train.seq_len)
    abstract, _ = sharding.abstract_init(other, mesh, sharding.rules(c), jax.random.PRNGKey(0))
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        checkpoint.Checkpointer(str(tmp_path)).restore(abstract)


def test_dry_run_plans_a_mesh_larger_than_the_devices_without_allocating(capsys):
    from instructgpt_jax.stages import pretrain

    c = configs.base_config("pretrain", "test")
    c.dry_run = True
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 16, 8, 4  # 512 devices; 8 are present
    c.train.batch_size = 128
    plan = pretrain.run(c, "/nonexistent/never/created")
    assert plan["mesh"] == {"data": 16, "fsdp": 8, "tensor": 4} and "xla_temp_gib" not in plan
    full_bytes = 136_960 * 4  # matrices split 8 (fsdp) x 4 (tensor) ways; biases and gains less
    assert full_bytes / 64 < plan["params_gib"] * 2**30 < full_bytes / 8
    assert plan["optimizer_gib"] == pytest.approx(2 * plan["params_gib"], rel=0.05)  # Adam mu and nu
    assert "dry run on a {'data': 16, 'fsdp': 8, 'tensor': 4} mesh (512 devices)" in capsys.readouterr().out


def test_dry_run_compiles_when_the_mesh_fits():
    from instructgpt_jax.stages import pretrain

    c = configs.base_config("pretrain", "test")
    c.dry_run = True
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    plan = pretrain.run(c, "/nonexistent/never/created")
    assert plan["xla_temp_gib"] > 0


def test_pmap_path_equals_the_mesh_path(single_device):
    from instructgpt_jax.train import pmap

    loss1, params1, _ = single_device
    c, mesh, model, _, state, _ = build((1, 1, 1), 1)
    step = pmap.make_pmap_update_step(steps.pretrain_loss(model), c)
    replicated = pmap.replicate(jax.device_get(state))
    for i in range(2):
        replicated, metrics = step(replicated, {"tokens": np.asarray(tokens(i))})
    assert float(metrics["loss"]) == pytest.approx(loss1, abs=1e-5)
    params8 = pmap.unreplicate(jax.device_get(replicated.params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params1, params8)


def test_pmap_weights_devices_by_their_token_counts():
    from instructgpt_jax.train import pmap

    c, mesh, model, _, state, _ = build((1, 1, 1), 1)

    def masked_loss(params, batch, rng):  # mean over a per-device number of tokens
        x = params["ln_f"]["scale"][0] * batch["x"]
        return (x * batch["m"]).sum() / batch["m"].sum(), {"weight": batch["m"].sum()}

    x = np.arange(8, dtype=np.float32)[:, None].repeat(4, 1)
    m = np.zeros((8, 4), np.float32)
    m[0] = 1.0  # device 0 counts four tokens, device d > 0 one token
    m[1:, 0] = 1.0
    step = pmap.make_pmap_update_step(masked_loss, c)
    _, metrics = step(pmap.replicate(jax.device_get(state)), {"x": x, "m": m})
    assert float(metrics["loss"]) == pytest.approx((x * m).sum() / m.sum())
