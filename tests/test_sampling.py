"""KV-cache sampling against full recomputation: greedy, tempered log-probabilities, EOS, top-k/top-p,
seeds, 1 vs 8 devices, and no recompilation when temperature or top-p change."""
import functools
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructgpt_jax import configs
from instructgpt_jax.data import tokenizer as tokenizer_lib
from instructgpt_jax.rl import sampling
from instructgpt_jax.train import sharding, steps

PROMPT_LEN, NEW = 8, 10
EOS = tokenizer_lib.EOS_ID
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [20], [30, 31, 32, 33, 34]]


def config(mesh_shape=(1, 1, 1)):
    c = configs.base_config("ppo", "test")
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh_shape
    return c


def init_boxed(model):
    return lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, PROMPT_LEN), jnp.int32))["params"]


def lively(params):
    """At init, tied embeddings make the model repeat its last token with near-uniform probabilities.
    Larger block weights and embeddings give varied greedy continuations with clear top-1 margins."""
    scale = lambda tree, s: jax.tree.map(lambda p: p * s, tree)  # noqa: E731
    return {k: scale(v, 6.0) if k.startswith("h_") else scale(v, 20.0) if k == "wte" else v for k, v in params.items()}


@pytest.fixture(scope="module")
def setup():
    c = config()
    mesh = sharding.make_mesh(c, jax.devices()[:1])
    model = steps.build_model(c)
    params = lively(nn.meta.unbox(init_boxed(model)()))
    tokens, mask = sampling.left_pad(PROMPTS, PROMPT_LEN)
    sampler = sampling.make_sampler(c, model, mesh, max_new_tokens=NEW)
    recompute = jax.jit(functools.partial(sampling.full_recompute_sample, model, max_new_tokens=NEW))
    greedy = sampler(params, tokens, mask, jax.random.PRNGKey(0), 0.0, 1.0)
    return dict(config=c, mesh=mesh, model=model, params=params, tokens=tokens, mask=mask, sampler=sampler,
                recompute=recompute, rescore=jax.jit(functools.partial(rescored_logprobs, model)),
                greedy=jax.device_get(greedy))


def rescored_logprobs(model, params, out, temperature):
    """log softmax(logits / temperature) of each response token, from one forward pass over prompt + response."""
    valid = jnp.concatenate([out.tokens[:, :PROMPT_LEN] != 0, out.response_mask > 0], axis=1)
    logits = model.apply({"params": params}, out.tokens, sampling.positions_from_mask(valid), valid)
    logp = jax.nn.log_softmax(logits[:, PROMPT_LEN - 1:-1] / temperature, axis=-1)
    return jnp.take_along_axis(logp, out.response[..., None], axis=-1)[..., 0] * out.response_mask


def test_left_pad_right_aligns_and_truncates_from_the_left():
    tokens, mask = sampling.left_pad([[4, 5], [1, 2, 3, 4, 5, 6]], 4, pad_id=0)
    np.testing.assert_array_equal(tokens, [[0, 0, 4, 5], [3, 4, 5, 6]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [1, 1, 1, 1]])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sampling.left_pad([[4], []], 4)


def test_positions_count_only_real_tokens():
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(sampling.positions_from_mask(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])


def test_greedy_with_cache_equals_greedy_full_recompute(setup):
    s, greedy = setup, setup["greedy"]
    ref = s["recompute"](s["params"], s["tokens"], s["mask"], jax.random.PRNGKey(0), 0.0)
    np.testing.assert_array_equal(greedy.response, ref.response)
    np.testing.assert_array_equal(greedy.tokens[:, :PROMPT_LEN], s["tokens"])
    np.testing.assert_allclose(greedy.logprobs, ref.logprobs, atol=1e-4)
    assert len({tuple(r) for r in greedy.response}) == len(PROMPTS)  # the rows really differ
    assert greedy.response.shape == (len(PROMPTS), NEW) and greedy.tokens.shape == (len(PROMPTS), PROMPT_LEN + NEW)


def test_logprobs_are_the_tempered_log_softmax_of_the_chosen_tokens(setup):
    s, temperature = setup, 0.7
    out = s["sampler"](s["params"], s["tokens"], s["mask"], jax.random.PRNGKey(3), temperature, 1.0)
    np.testing.assert_allclose(out.logprobs, s["rescore"](s["params"], out, temperature), atol=1e-4)
    assert (out.logprobs < 0).all() and (out.response != s["greedy"].response).any()
    ref = s["recompute"](s["params"], s["tokens"], s["mask"], jax.random.PRNGKey(3), temperature)
    np.testing.assert_array_equal(out.response, ref.response)  # the same draws without a cache


def swap_token_embeddings(params, a, b):
    """Relabels token a as b and b as a: the model's outputs are the old ones with a and b swapped."""
    wte = params["wte"]["embedding"]
    return {**params, "wte": {"embedding": wte.at[jnp.array([a, b])].set(wte[jnp.array([b, a])])}}


def test_eos_stops_each_sequence_and_pads_the_rest(setup):
    s, greedy = setup, setup["greedy"]
    x = int(greedy.response[0, 3])  # a token row 0 emits mid-way becomes EOS
    assert x not in (0, EOS) and all(x not in p and EOS not in p for p in PROMPTS)
    out = s["sampler"](swap_token_embeddings(s["params"], x, EOS), s["tokens"], s["mask"], jax.random.PRNGKey(0), 0.0, 1.0)
    relabelled = np.where(greedy.response == x, EOS, np.where(greedy.response == EOS, x, greedy.response))
    for row, expected in enumerate(relabelled):
        hits = np.flatnonzero(expected == EOS)
        length = hits[0] + 1 if len(hits) else NEW
        np.testing.assert_array_equal(out.response[row, :length], expected[:length])
        assert (out.response[row, length:] == 0).all() and (out.logprobs[row, length:] == 0).all()
        np.testing.assert_array_equal(out.response_mask[row], np.arange(NEW) < length)
        assert out.lengths[row] == length and bool(out.ended[row]) == bool(len(hits))
    assert out.ended[0] and not out.ended.all()


def test_all_sequences_ending_at_once_leaves_only_pad(setup):
    s = setup
    params = dict(s["params"])  # final LayerNorm outputs EOS's embedding whatever the input
    params["ln_f"] = {"scale": jnp.zeros_like(params["ln_f"]["scale"]), "bias": params["wte"]["embedding"][EOS]}
    out = s["sampler"](params, s["tokens"], s["mask"], jax.random.PRNGKey(0), 1.0, 1.0)
    np.testing.assert_array_equal(out.response[:, 0], EOS)
    assert (out.response[:, 1:] == 0).all() and (out.response_mask[:, 1:] == 0).all()
    assert out.ended.all() and (out.lengths == 1).all()


def test_top_k_1_equals_greedy(setup):
    s = setup
    sampler = sampling.make_sampler(s["config"], s["model"], s["mesh"], max_new_tokens=NEW, top_k=1)
    out = sampler(s["params"], s["tokens"], s["mask"], jax.random.PRNGKey(5), 1.0, 1.0)
    np.testing.assert_array_equal(out.response, s["greedy"].response)
    np.testing.assert_allclose(out.logprobs, s["greedy"].logprobs, atol=1e-5)  # scored untruncated, at T=1


def test_tiny_top_p_equals_greedy(setup):
    s = setup
    out = s["sampler"](s["params"], s["tokens"], s["mask"], jax.random.PRNGKey(5), 1.0, 1e-6)
    np.testing.assert_array_equal(out.response, s["greedy"].response)


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    logits = jnp.log(jnp.array([[0.1, 0.5, 0.15, 0.25]]))
    truncate = jax.jit(sampling.truncated_logits, static_argnums=2)
    kept = lambda p, k=0: np.isfinite(truncate(logits, p, k))[0].tolist()  # noqa: E731
    assert kept(0.5) == [False, True, False, False]
    assert kept(0.6) == [False, True, False, True]
    assert kept(0.9) == [False, True, True, True]
    assert kept(1.0) == [True] * 4
    assert kept(1.0, k=2) == [False, True, False, True]
    assert kept(0.6, k=3) == [False, True, False, True]


def test_temperature_sampling_is_seeded(setup):
    s = setup
    draw = lambda seed: s["sampler"](s["params"], s["tokens"], s["mask"], jax.random.PRNGKey(seed), 1.5, 1.0).response  # noqa: E731
    a, b, c = draw(11), draw(11), draw(12)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and (a != s["greedy"].response).any()


def test_new_temperature_or_top_p_values_reuse_the_compilation(setup):
    s = setup
    jitted = s["sampler"].__wrapped__
    s["sampler"](s["params"], s["tokens"], s["mask"], jax.random.PRNGKey(0), 0.0, 1.0)
    compiled = jitted._cache_size()
    for temperature, top_p in [(0.3, 0.9), (1.0, 0.5), (jnp.float32(2.0), np.float32(0.95))]:
        s["sampler"](s["params"], s["tokens"], s["mask"], jax.random.PRNGKey(1), temperature, top_p)
    assert jitted._cache_size() == compiled == 1


def test_sharded_sampler_matches_one_device(setup):
    s = setup
    c = config((2, 2, 2))
    mesh = sharding.make_mesh(c, jax.devices()[:8])
    _, shardings = sharding.abstract_init(init_boxed(s["model"]), mesh, sharding.rules(c))
    params = jax.device_put(s["params"], shardings)
    sampler = sampling.make_sampler(c, s["model"], mesh, max_new_tokens=NEW, params_shardings=shardings)
    args = (s["tokens"], s["mask"], jax.random.PRNGKey(7), 1.0, 0.9)
    out8, out1 = sampler(params, *args), s["sampler"](s["params"], *args)
    np.testing.assert_array_equal(out8.response, out1.response)
    np.testing.assert_allclose(out8.logprobs, out1.logprobs, atol=1e-4)
    assert out8.response.sharding.spec[0] == ("data", "fsdp")


def test_decode_responses_stops_at_eos():
    proto = tokenizer_lib.train_model_proto([inspect.getsource(sampling)], vocab_size=400)
    tok = tokenizer_lib.Tokenizer(proto)
    ids = tok.encode("return tokens")
    response = np.zeros((2, len(ids) + 2), np.int32)
    response[0, :len(ids)], response[0, len(ids)] = ids, EOS
    response[1, :len(ids) + 2] = ids + ids[:2]
    out = sampling.SampleOutput(tokens=response, response=response, response_mask=response > 0,
                                logprobs=np.zeros(response.shape), ended=np.array([True, False]),
                                lengths=np.array([len(ids) + 1, len(ids) + 2]))
    texts, ended = sampling.decode_responses(tok, out)
    assert texts[0] == "return tokens" and texts[1].startswith("return tokens") and ended == [True, False]
