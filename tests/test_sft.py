"""SFT: response-only loss through the real step's loss, pretraining mix, epoch selection, the stage end to end."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from instructgpt_jax import configs, losses
from instructgpt_jax.data import pipeline, tasks, tokenizer as tokenizer_lib
from instructgpt_jax.errors import CheckpointError, ConfigError
from instructgpt_jax.stages import sft
from instructgpt_jax.train import checkpoint, sharding, steps
from instructgpt_jax.train.state import TrainState, make_optimizer
from test_train import LAYOUTS, assert_same_update, stage_step_on_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 384  # the smallest the tokenizer allows; tiny tests need no more


def experiment_config(name: str, arg: str = "size=test") -> ml_collections.ConfigDict:
    return configs.experiment_config(name, arg)


def stage_config(name: str, root, tokenizer_path: str, arg: str = "size=test") -> ml_collections.ConfigDict:
    """An experiment's test-size config on a task-suite-only corpus and a small tokenizer, under root."""
    c = experiment_config(name, arg)
    c.data.dir = str(root / "data")
    c.data.sources = ml_collections.ConfigDict(
        {"tasks": pipeline.text_source_config("tasks", 1.0, num_documents=200, num_validation_documents=20)})
    c.tokenizer.path = tokenizer_path
    c.tokenizer.vocab_size = VOCAB
    c.train.progress_bar = False
    c.generation.update(batch_size=16, max_new_tokens=8)
    return c


def write_tokenizer(path) -> str:
    docs = tasks.pretraining_documents(0)
    proto = tokenizer_lib.train_model_proto((next(docs) for _ in range(3000)), vocab_size=VOCAB)
    path.write_bytes(proto)
    return str(path)


def save_initial_model(config, workdir: str, seed: int = 1, model=None):
    """A freshly initialised GPT (or `model`) saved as if an earlier stage had trained it; returns its params."""
    mesh = sharding.make_mesh(config)
    model = steps.build_model(config) if model is None else model
    init = steps.init_state_fn(model, make_optimizer(config.optim), config.train.seq_len)
    state, _ = sharding.sharded_init(init, mesh, sharding.rules(config), jax.random.PRNGKey(seed))
    ck = checkpoint.Checkpointer(workdir)
    ck.save(1, state)
    ck.close()
    return state.params


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    return root, write_tokenizer(root / "tokenizer.model")


@pytest.fixture(scope="module")
def model_and_params(env):
    c = stage_config("sft", *env)
    model = steps.build_model(c)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, c.train.seq_len), jnp.int32))["params"]
    return c, model, nn.meta.unbox(params)


class LogitProbe:
    """Wraps a model so its logits are logits + probe: d loss / d probe = d loss / d logits."""

    def __init__(self, model, probe):
        self.model, self.probe = model, probe

    def apply(self, variables, tokens, **kwargs):
        return self.model.apply(variables, tokens, **kwargs) + self.probe


@pytest.mark.parametrize("prompt_loss_weight", [0.0, 0.5])
def test_prompt_positions_get_no_gradient_unless_weighted(model_and_params, prompt_loss_weight):
    c, model, params = model_and_params
    prompt, completion, t = [5, 6, 7, 8, 9], [10, 11, 12], c.train.seq_len
    ex = pipeline.sft_example(prompt, completion, eos_id=1, pad_id=0, seq_len=t)
    batch = {k: jnp.asarray(v)[None] for k, v in ex.items()}
    probe = jnp.zeros((1, t, model.cfg.padded_vocab))
    loss_fn = lambda p: steps.sft_loss(LogitProbe(model, p), prompt_loss_weight)(params, batch, None)[0]  # noqa: E731
    grad = jnp.abs(jax.grad(loss_fn)(probe)).sum(-1)[0]
    predicts_prompt = np.arange(t) < len(prompt) - 1  # position p predicts token p + 1
    predicts_response = (np.arange(t) >= len(prompt) - 1) & (np.arange(t) < len(prompt) + len(completion))
    assert bool(jnp.all(grad[predicts_response] > 0))
    assert bool(jnp.all(grad[~predicts_prompt & ~predicts_response] == 0))  # padding
    if prompt_loss_weight:
        assert bool(jnp.all(grad[predicts_prompt] > 0))
    else:
        assert bool(jnp.all(grad[predicts_prompt] == 0))


def test_pretraining_mix_weighs_the_two_losses(model_and_params):
    c, model, params = model_and_params
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(4, VOCAB, size=(2, c.train.seq_len + 1)), jnp.int32)
    mask = jnp.zeros((2, c.train.seq_len)).at[:, 10:20].set(1.0)
    pretrain = jnp.asarray(rng.integers(4, VOCAB, size=(1, c.train.seq_len + 1)), jnp.int32)
    batch = {"tokens": tokens, "loss_mask": mask, "pretrain_tokens": pretrain}
    mixed, metrics = steps.sft_loss(model, 0.0, 0.25)(params, batch, None)
    sft_only, _ = steps.sft_loss(model)(params, batch, None)
    lm = losses.lm_loss(model.apply({"params": params}, pretrain[:, :-1]), pretrain[:, 1:])
    assert float(mixed) == pytest.approx(0.75 * float(sft_only) + 0.25 * float(lm), rel=1e-5)
    assert float(metrics["pretrain_loss"]) == pytest.approx(float(lm), rel=1e-5)


def test_mixed_batches_carry_pretraining_rows_and_resume_through_json(env):
    c = stage_config("sft", *env)
    c.data.demonstrations.path = sft.default_demonstrations(c)
    c.sft.pretrain_mix = 0.25
    tok = tokenizer_lib.Tokenizer.from_file(c.tokenizer.path)
    batches = sft.train_batches(c, tok)
    first = next(batches)
    t = c.train.seq_len
    assert first["tokens"].shape == (6, t + 1) and first["loss_mask"].shape == (6, t)
    assert first["pretrain_tokens"].shape == (2, t + 1)
    state = json.loads(json.dumps(batches.get_state()))
    expected = next(batches)
    resumed = sft.train_batches(c, tok)
    resumed.set_state(state)
    for key, value in next(resumed).items():
        np.testing.assert_array_equal(value, expected[key])
    with pytest.raises(ConfigError, match="both must divide by mesh.data"):  # 2 rows over 8 devices
        sft.validate_sft_config(c)


def test_resolve_stage_path_substitutes_the_workdir(tmp_path):
    assert sft.resolve_stage_path("{workdir}/../pretrain", str(tmp_path / "sft")) == str(tmp_path / "pretrain")
    assert sft.resolve_stage_path("/abs/rm", "anything") == "/abs/rm"


def test_selection_makes_the_best_epoch_the_latest_checkpoint(tmp_path):
    ck = checkpoint.Checkpointer(str(tmp_path), keep=5, async_save=False)
    state = lambda w, step: TrainState(step=jnp.int32(step), params={"w": jnp.full((3,), w)},  # noqa: E731
                                       opt_state={}, rng=jax.random.PRNGKey(0))
    for epoch in (1, 2, 3):
        ck.save(2 * epoch, state(float(epoch), 2 * epoch))
    ck.wait()
    on_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_device), state(0.0, 0))
    config = ml_collections.ConfigDict({"sft": {"epochs": 3}})
    loss = lambda params: float((params["w"][0] - 2.0) ** 2)  # noqa: E731 — epoch 2 is best
    selection = sft.select_epoch(config, ck, abstract, 2, {"validation_loss": loss})
    assert (selection["selected_epoch"], selection["selected_step"], selection["checkpoint_step"]) == (2, 4, 7)
    assert ck.latest_step() == 7
    np.testing.assert_array_equal(checkpoint.load_params(str(tmp_path), abstract.params)["w"], [2.0] * 3)
    by_reward = sft.select_epoch(config, ck, abstract, 2, {"validation_loss": loss, "reward": lambda p: -loss(p) + 5})
    assert by_reward["by"] == "reward" and by_reward["selected_epoch"] == 2
    ck.close()


def test_missing_pretrained_checkpoint_names_the_key_and_directory(env, tmp_path):
    c = stage_config("sft", *env)
    with pytest.raises(CheckpointError, match=r"init.params=.*nowhere.*checkpoints"):
        sft.run(c, str(tmp_path / "nowhere" / "sft"))


@pytest.fixture(scope="module")
def sft_run(env):
    root, tokenizer_path = env
    c = stage_config("sft", root, tokenizer_path)
    c.labeler.num_demonstrations = 96
    c.sft.gold_eval_prompts = 16
    pretrained = save_initial_model(c, str(root / "run" / "pretrain"))
    workdir = str(root / "run" / "sft")
    return c, workdir, pretrained, sft.run(c, workdir)


def test_stage_trains_selects_an_epoch_and_reports_gold_scores(sft_run):
    c, workdir, pretrained, result = sft_run
    selection = json.loads(open(os.path.join(workdir, sft.SELECTION_FILE)).read())
    per_epoch = selection["epochs"][0]["step"]
    assert [e["epoch"] for e in selection["epochs"]] == [1, 2] and selection["by"] == "validation_loss"
    best = min(selection["epochs"], key=lambda e: e["validation_loss"])
    assert selection["selected_epoch"] == best["epoch"]
    steps_saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))
    assert steps_saved[:2] == [per_epoch, 2 * per_epoch] and steps_saved[-1] == selection["checkpoint_step"]
    gold = json.loads(open(os.path.join(workdir, sft.GOLD_FILE)).read())
    assert {"pretrained_greedy", "sft_greedy", "sft_sampled", "sft_minus_pretrained_greedy"} <= set(gold)
    assert 0.0 <= gold["sft_greedy"]["mean"] <= 1.0
    config = json.loads(open(os.path.join(workdir, "config.json")).read())
    assert config["train"]["steps"] == 2 * per_epoch and config["data"]["demonstrations"]["path"].endswith(".jsonl")


def test_load_params_of_the_workdir_gives_the_selected_epoch(sft_run):
    c, workdir, pretrained, result = sft_run
    selection = result["selection"]
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), pretrained)
    loaded = checkpoint.load_params(workdir, abstract)
    ck = checkpoint.Checkpointer(workdir)
    init = steps.init_state_fn(steps.build_model(c), make_optimizer(c.optim), c.train.seq_len)
    abstract_state, _ = sharding.abstract_init(init, sharding.make_mesh(c), sharding.rules(c), jax.random.PRNGKey(0))
    selected = ck.restore(abstract_state, selection["selected_step"])[0].params
    ck.close()
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), jax.device_get(selected))
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), loaded, pretrained)
    assert all(jax.tree.leaves(changed))  # fine-tuned, not the initial model


# ------------------------------------------------------------------------------ the step on 8 devices


@pytest.fixture(scope="module")
def sft_update_on_one_device(model_and_params):
    """Two SFT steps with a prompt loss and the pretraining mix on a batch whose rows have 0..19 response
    tokens (a device with none): test_train.stage_step_on_devices."""
    c, model, params = model_and_params
    c = c.copy_and_resolve_references()
    c.sft.prompt_loss_weight, c.sft.pretrain_mix = 0.1, 0.25
    rng = np.random.default_rng(0)
    t = c.train.seq_len
    mask = np.zeros((8, t), np.float32)
    for row, (start, n) in enumerate(zip(rng.integers(2, 20, size=8), [5, 0, 19, 1, 12, 3, 7, 16])):
        mask[row, start:start + n] = 1.0
    batch = {"tokens": rng.integers(4, VOCAB, size=(8, t + 1)).astype(np.int32), "loss_mask": mask,
             "pretrain_tokens": rng.integers(4, VOCAB, size=(8, t + 1)).astype(np.int32)}
    return stage_step_on_devices(c, model, steps.make_sft_step, batch, params)


@pytest.mark.parametrize("mesh_shape,parallelism", LAYOUTS)
def test_sft_step_on_8_devices_equals_one_device(sft_update_on_one_device, mesh_shape, parallelism):
    on, one = sft_update_on_one_device
    assert_same_update(one, on(mesh_shape, 8, parallelism=parallelism),
                       keys=("loss", "response_loss", "prompt_loss", "pretrain_loss", "response_tokens"))
    assert float(one[0]["response_tokens"]) == 63
