"""Hugging Face GPT-2 import/export: logits equal transformers', exact round trips, clear errors."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as st_numpy

from instructgpt_jax.errors import CheckpointError, ConfigError
from instructgpt_jax.interop import hf_gpt2
from instructgpt_jax.models import gpt

HF_CONFIG = dict(model_type="gpt2", n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_size=300,
                 activation_function="gelu_new", layer_norm_epsilon=1e-5)


def random_params(cfg: gpt.GPTConfig, seed: int = 0) -> dict:
    """Every parameter drawn at random (LayerNorm gains and biases too, so none can be mis-mapped unseen)."""
    shapes = jax.eval_shape(lambda: gpt.GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    leaves, treedef = jax.tree.flatten(nn.meta.unbox(shapes))
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(treedef, [rng.normal(0, 0.2, s.shape).astype(np.float32) for s in leaves])


def logits(cfg, params, tokens):
    return np.asarray(gpt.GPT(cfg).apply({"params": params}, jnp.asarray(tokens)))[..., :cfg.vocab_size]


@pytest.fixture(scope="module")
def tiny():
    model_cfg = hf_gpt2.model_config_from_hf(HF_CONFIG)
    cfg = gpt.GPTConfig.from_config(model_cfg)
    return model_cfg, cfg, random_params(cfg)


def test_config_maps_gpt2_fields(tiny):
    model_cfg, cfg, _ = tiny
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_ff, cfg.max_len, cfg.vocab_size) == \
        (2, 32, 4, 8, 128, 32, 300)
    assert cfg.padded_vocab == 384 and model_cfg.attention.layers == "dense"
    assert 32 % model_cfg.attention.block_size == 0
    assert hf_gpt2.hf_config_from_model(cfg, eos_token_id=299)["n_embd"] == 32


def test_export_then_import_round_trips_exactly(tiny, tmp_path):
    model_cfg, cfg, params = tiny
    hf_gpt2.export_hf_gpt2(params, model_cfg, str(tmp_path))
    again, again_cfg = hf_gpt2.import_hf_gpt2(str(tmp_path))
    assert gpt.GPTConfig.from_config(again_cfg) == cfg
    expected = jax.tree.map(np.copy, params)
    expected["wte"]["embedding"][cfg.vocab_size:] = 0.0  # padded rows are not GPT-2's; they come back as zeros
    jax.tree.map(np.testing.assert_array_equal, again, expected)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, cfg.max_len))
    np.testing.assert_array_equal(logits(cfg, again, tokens), logits(cfg, params, tokens))
    hf_gpt2.export_hf_gpt2(again, again_cfg, str(tmp_path / "second"))
    first, second = (st_numpy.load_file(str(d / hf_gpt2.WEIGHTS_FILE)) for d in (tmp_path, tmp_path / "second"))
    assert first.keys() == second.keys() and all(np.array_equal(first[k], second[k]) for k in first)


def test_qkv_columns_are_query_key_value_head_major(tiny):
    _, cfg, params = tiny
    state = hf_gpt2.hf_state_from_params(params, cfg)
    c_attn = state["transformer.h.1.attn.c_attn.weight"]  # [d, 3d]
    kernel = params["h_1"]["attn"]["qkv"]["kernel"]  # [d, 3, H, D]
    d, D = cfg.d_model, cfg.d_head
    np.testing.assert_array_equal(c_attn[:, d + 2 * D:d + 3 * D], kernel[:, 1, 2])  # key, head 2


def test_bfloat16_checkpoint_is_read(tiny, tmp_path):
    from safetensors import flax as st_flax

    model_cfg, cfg, params = tiny
    hf_gpt2.export_hf_gpt2(params, model_cfg, str(tmp_path))
    path = str(tmp_path / hf_gpt2.WEIGHTS_FILE)
    state = st_numpy.load_file(path)
    st_flax.save_file({k: jnp.asarray(v, jnp.bfloat16) for k, v in state.items()}, path)
    again, _ = hf_gpt2.import_hf_gpt2(str(tmp_path))
    want = np.asarray(jnp.asarray(params["h_0"]["mlp"]["fc"]["kernel"], jnp.bfloat16), np.float32)
    np.testing.assert_array_equal(again["h_0"]["mlp"]["fc"]["kernel"], want)


def test_imported_workdir_is_what_a_stage_loads(tiny, tmp_path):
    model_cfg, cfg, params = tiny
    hf_gpt2.write_params_workdir(str(tmp_path), params, model_cfg)
    loaded, loaded_cfg, eos_id = hf_gpt2.read_params_workdir(str(tmp_path))
    assert gpt.GPTConfig.from_config(loaded_cfg) == cfg and eos_id == 299  # GPT-2's: the last entry
    assert hf_gpt2.workdir_eos_id({"model": {"vocab_size": 300}, "tokenizer": {"kind": "sentencepiece"}}) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), params)
    flags = hf_gpt2.config_overrides(model_cfg, str(tmp_path))
    assert "--config.model.d_model=32" in flags and "--config.train.seq_len=32" in flags
    assert not any("tokenizer" in f for f in flags)  # no vocab.json / merges.txt there
    (tmp_path / "tokenizer.json").write_text("{}")
    assert f"--config.tokenizer.path={tmp_path}" in hf_gpt2.config_overrides(model_cfg, str(tmp_path))


def write_hf_dir(path, config: dict, state: dict):
    path.mkdir(exist_ok=True)
    (path / hf_gpt2.CONFIG_FILE).write_text(json.dumps(config))
    st_numpy.save_file(state, str(path / hf_gpt2.WEIGHTS_FILE))


def test_bad_checkpoints_name_the_file_and_key(tiny, tmp_path):
    _, cfg, params = tiny
    state = hf_gpt2.hf_state_from_params(params, cfg)
    with pytest.raises(ConfigError, match="config.json: no such file"):
        hf_gpt2.import_hf_gpt2(str(tmp_path))
    (tmp_path / hf_gpt2.CONFIG_FILE).write_text(json.dumps(HF_CONFIG))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        hf_gpt2.import_hf_gpt2(str(tmp_path))
    write_hf_dir(tmp_path / "wide", {**HF_CONFIG, "n_embd": 64}, state)
    with pytest.raises(CheckpointError, match="wte.weight has shape"):
        hf_gpt2.import_hf_gpt2(str(tmp_path / "wide"))
    write_hf_dir(tmp_path / "short", HF_CONFIG, {k: v for k, v in state.items() if "h.1.mlp.c_fc.bias" not in k})
    with pytest.raises(CheckpointError, match="h.1.mlp.c_fc.bias"):
        hf_gpt2.import_hf_gpt2(str(tmp_path / "short"))
    write_hf_dir(tmp_path / "untied", HF_CONFIG, {**state, "lm_head.weight": state["transformer.wte.weight"] + 1})
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        hf_gpt2.import_hf_gpt2(str(tmp_path / "untied"))
    write_hf_dir(tmp_path / "legacy", HF_CONFIG, {k.removeprefix("transformer."): v for k, v in state.items()})
    assert hf_gpt2.import_hf_gpt2(str(tmp_path / "legacy"))[0]["ln_f"]["bias"].shape == (32,)


@pytest.mark.parametrize("key,value", [("activation_function", "gelu"), ("layer_norm_epsilon", 1e-6),
                                       ("scale_attn_by_inverse_layer_idx", True), ("n_head", 5)])
def test_unsupported_configs_are_refused_by_key(key, value):
    with pytest.raises(ConfigError, match=key if key != "n_head" else "n_embd=32 is not divisible"):
        hf_gpt2.model_config_from_hf({**HF_CONFIG, key: value})


def test_sparse_attention_cannot_be_exported(tiny):
    model_cfg, _, params = tiny
    sparse = model_cfg.copy_and_resolve_references()
    sparse.attention.layers = "local"
    with pytest.raises(ConfigError, match="model.attention.layers"):
        hf_gpt2.hf_config_from_model(gpt.GPTConfig.from_config(sparse))


def test_logits_equal_transformers_gpt2():
    torch = pytest.importorskip("torch", reason="the `hf` extra (pip install -e '.[hf]') is not installed")
    transformers = pytest.importorskip("transformers", reason="the `hf` extra (pip install -e '.[hf]') is not installed")
    import tempfile

    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_size=300,
                                     bos_token_id=299, eos_token_id=299)
    model = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # LayerNorms and biases too: HF initialises them to 1 and 0
            p.normal_(0.0, 0.2)
    tokens = np.random.default_rng(0).integers(0, 300, (2, 32))
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.numpy()
    with tempfile.TemporaryDirectory() as hf_dir, tempfile.TemporaryDirectory() as out_dir:
        model.save_pretrained(hf_dir)
        params, model_cfg = hf_gpt2.import_hf_gpt2(hf_dir)
        cfg = gpt.GPTConfig.from_config(model_cfg)
        np.testing.assert_allclose(logits(cfg, params, tokens), theirs, atol=1e-4, rtol=0)
        hf_gpt2.export_hf_gpt2(params, model_cfg, out_dir, eos_token_id=299)
        reloaded = transformers.GPT2LMHeadModel.from_pretrained(out_dir).eval()
        with torch.no_grad():
            np.testing.assert_array_equal(reloaded(torch.tensor(tokens)).logits.numpy(), theirs)
        again, _ = hf_gpt2.import_hf_gpt2(out_dir)
        jax.tree.map(np.testing.assert_array_equal, again, params)
