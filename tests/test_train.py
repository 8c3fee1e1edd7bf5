"""Sharded pretraining step (1 device vs 8 fake devices), optimizer, non-finite guard, checkpoints."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from instructgpt_jax import configs
from instructgpt_jax.train import checkpoint, sharding, steps
from instructgpt_jax.train.state import learning_rate_schedule, make_optimizer


def build(mesh_shape, n_devices, parallelism="mesh", **optim):
    c = configs.base_config("pretrain", "test")
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh_shape
    c.parallelism = parallelism
    c.optim.update(optim)
    mesh = sharding.make_mesh(c, jax.devices()[:n_devices])
    model = steps.build_model(c)
    init = steps.init_state_fn(model, make_optimizer(c.optim), c.train.seq_len)
    state, shardings = sharding.sharded_init(init, mesh, sharding.rules(c), jax.random.PRNGKey(0))
    return c, mesh, model, init, state, shardings


def tokens(seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), (8, 65), 0, 512)


def run_steps(mesh_shape, n_devices, n=2, parallelism="mesh"):
    c, mesh, model, _, state, shardings = build(mesh_shape, n_devices, parallelism)
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


# The 8-device layouts a stage's step must reproduce 1 device on: (mesh shape, parallelism).
LAYOUTS = [((8, 1, 1), "mesh"), ((2, 2, 2), "mesh"), ((1, 4, 2), "mesh"), ((8, 1, 1), "pmap")]


def update_on_devices(c, mesh_shape, n_devices, init, make_step, batch, params=None, parallelism="mesh", n=2):
    """n steps of make_step(config, mesh, state_shardings) on a mesh_shape mesh of the first n_devices devices,
    from init's state (its params replaced by `params`); returns the last metrics and the state, on the host.

    Adam's ε is 1e-4: its first steps are ±lr wherever |gradient| ≫ ε, which would turn float noise in a
    gradient that is 0 in exact arithmetic (the RM head's bias) into a difference of 2·lr."""
    c = c.copy_and_resolve_references()
    c.optim.eps = 1e-4
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh_shape
    c.parallelism = parallelism
    mesh = sharding.make_mesh(c, jax.devices()[:n_devices])
    state, shardings = sharding.sharded_init(init, mesh, sharding.rules(c), jax.random.PRNGKey(0))
    if params is not None:  # a copy: the step donates its state
        state = state.replace(params=jax.device_put(jax.tree.map(jnp.copy, params), shardings.params))
    step = make_step(c, mesh, shardings)
    for _ in range(n):
        state, metrics = step(state, batch)
    return jax.device_get(metrics), jax.device_get(state)


def stage_step_on_devices(c, model, make_stage_step, batch, params):
    """(on, on one device): on(mesh_shape, n_devices, parallelism=) is update_on_devices of the stage's
    make_stage_step(config, model, mesh, state_shardings) from `params` on `batch`."""
    init = steps.init_state_fn(model, make_optimizer(c.optim), c.train.seq_len)
    on = functools.partial(update_on_devices, c, init=init, batch=batch, params=params,
                           make_step=lambda c, mesh, shardings: make_stage_step(c, model, mesh, shardings))
    return on, on((1, 1, 1), 1)


def assert_same_update(reference, other, keys=("loss",)):
    """Metrics (loss: relative 1e-6, as a large PPO-ptx loss needs) and updated parameters (1e-5) agree."""
    (metrics1, state1), (metrics2, state2) = reference, other
    for key in keys:
        assert float(metrics2[key]) == pytest.approx(float(metrics1[key]), rel=1e-6, abs=1e-5), key
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), state1.params, state2.params)


def test_pmap_path_equals_the_mesh_path(single_device):
    loss1, params1, _ = single_device
    loss8, params8, state8 = run_steps((8, 1, 1), 8, parallelism="pmap")
    assert loss8 == pytest.approx(loss1, abs=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params1, params8)
    kernel = state8.params["h_0"]["mlp"]["fc"]["kernel"]
    assert kernel.sharding.is_fully_replicated and len(kernel.sharding.device_set) == 8  # an ordinary array


def test_pmap_combines_means_over_different_items_as_one_device_does():
    """A loss mixing a mean over a per-device number of tokens (none on one device) with a plain mean over
    rows, plus a count and a mean over other items: pmap on 8 devices gives the metrics and update of 1."""
    from instructgpt_jax.train import pmap
    from instructgpt_jax.train.state import create_state

    def loss_fn(params, batch, rng):
        m = batch["m"]
        tokens = (jnp.square(batch["x"] - params["w"]) * m).sum() / jnp.maximum(m.sum(), 1.0)
        rows = jnp.mean(jnp.square(batch["y"] * params["v"]))
        metrics = {"token_loss": tokens, "row_loss": rows, "tokens": m.sum(), "rows_seen": batch["y"].shape[0],
                   "first_token": (batch["x"][:, 0] * m[:, 0]).sum() / jnp.maximum(m[:, 0].sum(), 1.0),
                   pmap.WEIGHTS: {"loss": m.sum(), "row_loss": 1.0, "tokens": pmap.TOTAL, "rows_seen": 1.0,
                                  "first_token": m[:, 0].sum()},
                   pmap.TERMS: {"token_loss": 1.0, "row_loss": 0.5}}
        return tokens + 0.5 * rows, metrics

    rng = np.random.default_rng(0)
    m = np.zeros((8, 4), np.float32)
    m[0], m[2:, 0] = 1.0, 1.0  # device 0 counts 4 tokens, device 1 none, the others 1
    batch = {"x": rng.normal(size=(8, 4)).astype(np.float32), "m": m, "y": rng.normal(size=(8,)).astype(np.float32)}
    c = configs.base_config("pretrain", "test")
    c.optim.warmup_steps = 0
    tx = make_optimizer(c.optim)
    init = lambda rng: create_state({"w": jnp.zeros((4,)), "v": jnp.ones(())}, tx, rng)  # noqa: E731

    def make_step(c, mesh, shardings):
        return steps.make_update_step(loss_fn, c, mesh, shardings, sharding.batch_sharding(mesh))

    one = update_on_devices(c, (1, 1, 1), 1, init, make_step, batch)
    eight = update_on_devices(c, (8, 1, 1), 8, init, make_step, batch, parallelism="pmap")
    assert_same_update(one, eight, keys=("loss", "token_loss", "row_loss", "tokens", "first_token", "grad_norm"))
    assert float(one[0]["tokens"]) == 10 and pmap.WEIGHTS not in one[0] and pmap.TERMS not in one[0]
    assert (int(one[0]["rows_seen"]), int(eight[0]["rows_seen"])) == (8, 1)  # pmap: each device sees its rows
    assert float(np.abs(eight[1].params["w"]).sum()) > 0


@pytest.mark.parametrize("mesh,batch_size,match", [
    ((4, 2, 1), 8, r"parallelism='pmap'.*mesh.fsdp=1 and mesh.tensor=1"),
    ((4, 1, 2), 8, r"parallelism='pmap'.*mesh.fsdp=1 and mesh.tensor=1"),
    ((-1, 1, 1), 12, r"parallelism='pmap' splits train.batch_size=12 over the 8 devices"),
])
def test_pmap_rejects_sharded_meshes_and_uneven_batches(mesh, batch_size, match):
    from instructgpt_jax.errors import ConfigError

    c = configs.base_config("pretrain", "test")
    c.parallelism, c.train.batch_size = "pmap", batch_size
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    with pytest.raises(ConfigError, match=match):
        configs.validate(c, num_devices=8)
    c.parallelism = "data"
    with pytest.raises(ConfigError, match="parallelism must be 'mesh' or 'pmap'"):
        configs.validate(c, num_devices=8)


def test_pretrain_stage_under_pmap_equals_the_mesh_and_resumes(tmp_path, monkeypatch, capsys):
    """experiments/pretrain.py:size=test for 4 steps with --config.parallelism=pmap (interrupted after step 2's
    checkpoint and rerun) ends with the mesh run's parameters."""
    import shutil

    from instructgpt_jax.stages import pretrain
    from instructgpt_jax.train import pmap
    from test_resume import final_params
    from test_sft import VOCAB, experiment_config, write_tokenizer

    tokenizer = write_tokenizer(tmp_path / "tokenizer.model")
    built = []
    make = pmap.make_pmap_update_step
    monkeypatch.setattr(pmap, "make_pmap_update_step", lambda *a, **k: built.append(1) or make(*a, **k))

    def run(parallelism, workdir):
        c = experiment_config("pretrain", "size=test,steps=4")
        c.parallelism = parallelism
        c.data.dir, c.tokenizer.path, c.tokenizer.vocab_size = str(tmp_path / "data"), tokenizer, VOCAB
        c.data.sources.stdlib.weight = 0.0
        c.data.sources.tasks.update(num_documents=200, num_validation_documents=20)
        c.train.update(checkpoint_every=2, eval_batches=1, progress_bar=False, async_checkpoints=False)
        pretrain.run(c, str(tmp_path / workdir))

    run("mesh", "mesh")
    assert not built
    run("pmap", "pmap")
    assert built
    straight = jax.tree.map(np.asarray, final_params(str(tmp_path / "pmap")))
    shutil.rmtree(tmp_path / "pmap" / "checkpoints" / "4")  # as if killed after step 2's checkpoint
    capsys.readouterr()
    run("pmap", "pmap")
    assert "resuming from" in capsys.readouterr().out
    resumed = final_params(str(tmp_path / "pmap"))
    jax.tree.map(np.testing.assert_array_equal, straight, jax.tree.map(np.asarray, resumed))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
                 final_params(str(tmp_path / "mesh")), resumed)


def test_pmap_dry_run_lowers_for_more_devices_than_present():
    from instructgpt_jax.stages import pretrain

    c = configs.base_config("pretrain", "test")
    c.dry_run, c.parallelism = True, "pmap"
    c.mesh.data, c.train.batch_size = 16, 16
    plan = pretrain.run(c, "/nonexistent/never/created")
    assert plan["mesh"] == {"data": 16, "fsdp": 1, "tensor": 1} and plan["lower_s"] > 0


def test_load_params_reads_one_subtree_of_a_checkpoint(tmp_path):
    """A PPO checkpoint's policy alone (its params also hold the value model): what the pipeline evaluates
    when ppo.ema_decay = 0."""
    from instructgpt_jax.errors import CheckpointError
    from instructgpt_jax.train.state import TrainState

    params = {"policy": {"w": jnp.arange(3.0)}, "value": {"v": jnp.ones((2, 2))}}
    ck = checkpoint.Checkpointer(str(tmp_path), async_save=False)
    ck.save(1, TrainState(step=jnp.int32(1), params=params, opt_state={}, rng=jax.random.PRNGKey(0)))
    ck.close()
    on_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {"w": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=on_device)}
    np.testing.assert_array_equal(checkpoint.load_params(str(tmp_path), abstract, subtree="policy")["w"], [0, 1, 2])
    with pytest.raises(CheckpointError, match="not in this model"):
        checkpoint.load_params(str(tmp_path), {"policy": abstract})  # the value model is there too
    with pytest.raises(CheckpointError, match="has no 'critic'"):
        checkpoint.load_params(str(tmp_path), abstract, subtree="critic")


def test_ema_is_optax_debiased_average_of_the_iterates():
    """apply_update's incremental EMA equals optax.ema(debias=True) of the parameters after each update."""
    from instructgpt_jax.train.state import TrainState

    decay, tx = 0.9, optax.sgd(1.0)
    params = {"w": jnp.zeros(3)}
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), rng=jax.random.PRNGKey(0),
                       ema_params=params)
    reference = optax.ema(decay, debias=True)
    ref_state = reference.init(params)
    for g in ([1.0, 0.0, 2.0], [0.5, -1.0, 0.0], [-3.0, 1.0, 1.0]):
        state, _ = steps.apply_update(state, {"w": -jnp.asarray(g)}, tx, ema_decay=decay)
        expected, ref_state = reference.update(state.params, ref_state)
        np.testing.assert_allclose(state.ema_params["w"], expected["w"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(steps.ema_step_size(decay, 1), 1.0, rtol=1e-6)


def chunked_and_full_models(chunk=100):
    """The test model with the LM head chunked (100 tokens: 512 in 6 chunks, the last padded) and without."""
    c = configs.base_config("pretrain", "test")
    c.model.vocab_size = 500  # padded to 512
    models = []
    for value in (chunk, 0):
        c.model.lm_head_chunk = value
        models.append(steps.build_model(c))
    params = steps.init_state_fn(models[1], make_optimizer(c.optim), c.train.seq_len)(jax.random.PRNGKey(0)).params
    return *models, nn.meta.unbox(params)


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_chunked_lm_head_gives_the_full_logits_loss_and_gradients(stage):
    chunked, full, params = chunked_and_full_models()
    ids = tokens() % 500
    if stage == "pretrain":
        batch, loss_of = {"tokens": ids}, steps.pretrain_loss
    else:  # response mask, λ·prompt loss and the pretraining mix: two weightings and a second LM loss
        response = jnp.arange(64)[None] >= 20 + jnp.arange(8)[:, None]
        batch = {"tokens": ids, "loss_mask": response.astype(jnp.float32), "pretrain_tokens": ids[::-1]}
        loss_of = functools.partial(steps.sft_loss, prompt_loss_weight=0.5, pretrain_mix=0.25)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_of(chunked), has_aux=True))(params, batch, None)
    (want, want_metrics), want_grads = jax.jit(jax.value_and_grad(loss_of(full), has_aux=True))(params, batch, None)
    assert float(loss) == pytest.approx(float(want), rel=1e-6)
    for key in ("response_loss", "prompt_loss", "pretrain_loss"):
        if key in want_metrics:
            assert float(metrics[key]) == pytest.approx(float(want_metrics[key]), rel=1e-6), key
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, want_grads)


@pytest.mark.parametrize("value, match", [(-1, r"model.lm_head_chunk must be >= 0"),
                                          (0.5, r"model.lm_head_chunk=0.5: expected int")])
def test_bad_lm_head_chunk_is_a_config_error(value, match):
    c = configs.base_config("pretrain", "test")
    c.model = {**c.model, "lm_head_chunk": value}  # as a config file could write it (no override type check)
    with pytest.raises(configs.ConfigError, match=match):
        configs.validate(c)
