"""Hugging Face GPT-2 checkpoints <-> this project's parameters (safetensors only, never pickle).

A Hugging Face GPT-2 directory holds `config.json` and `model.safetensors` (or shards listed in
`model.safetensors.index.json`). Its Conv1D weights are stored [in, out], so they map onto our
kernels by reshapes alone:

    wte.weight [V, d]            -> wte/embedding [padded V, d]  (rows past V are zeros)
    wpe.weight [n_positions, d]  -> wpe/embedding
    h.N.ln_1 / ln_2 / ln_f       -> h_N/ln_1 / ln_2, ln_f  (weight -> scale)
    h.N.attn.c_attn [d, 3d]      -> h_N/attn/qkv/kernel [d, 3, H, D]  (columns are q | k | v, head-major)
    h.N.attn.c_proj [d, d]       -> h_N/attn/out/kernel [H, D, d]
    h.N.mlp.c_fc / c_proj        -> h_N/mlp/fc / proj

The unembedding is tied to wte in both. GPT-2's `gelu_new` is our tanh-approximate GELU and its
LayerNorm epsilon is our 1e-5; a config.json asking for anything else is refused, not approximated.

    python -m instructgpt_jax.interop.hf_gpt2 import HF_DIR WORKDIR   # a checkpoint SFT/RM can start from
    python -m instructgpt_jax.interop.hf_gpt2 export WORKDIR OUT_DIR  # config.json + model.safetensors

A stage started from an imported workdir reads GPT-2's own BPE with `--config.tokenizer.kind=gpt2_bpe
--config.tokenizer.path=HF_DIR` (vocab.json + merges.txt, or tokenizer.json); `import` prints the flags.
"""
from __future__ import annotations

import json
import math
import os
import sys

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from safetensors import SafetensorError
from safetensors import numpy as st_numpy

from instructgpt_jax.data.tokenizer import EOS_ID, gpt2_bpe_files
from instructgpt_jax.errors import CheckpointError, ConfigError, UserError, report
from instructgpt_jax.models import attention, gpt

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # both are 0.5x(1 + tanh(√(2/π)(x + 0.044715x³)))
LAYER_NORM_EPSILON = 1e-5  # models/gpt.py layer_norm
HF_PREFIX = "transformer."
BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers older checkpoints store


# ------------------------------------------------------------------------------ configs


def _read_json(path: str, error=ConfigError) -> dict:
    if not os.path.isfile(path):
        raise error(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise error(f"{path}: cannot read it as JSON ({e})") from e


def model_config_from_hf(hf: dict, source: str = CONFIG_FILE) -> ml_collections.ConfigDict:
    """Our `model` config section for a GPT-2 config.json (dense attention, dropout off: a training choice)."""
    def get(key, default=None):
        value = hf.get(key, default)
        if value is None:
            raise ConfigError(f"{source}: no {key!r}")
        return value

    if hf.get("model_type", "gpt2") != "gpt2":
        raise ConfigError(f"{source}: model_type={hf['model_type']!r}, expected 'gpt2'")
    checks = {
        "activation_function": (get("activation_function", "gelu_new") in TANH_GELUS, f"one of {TANH_GELUS}"),
        "layer_norm_epsilon": (math.isclose(get("layer_norm_epsilon", 1e-5), LAYER_NORM_EPSILON), "1e-05"),
        "scale_attn_weights": (get("scale_attn_weights", True) is True, "true"),
        "scale_attn_by_inverse_layer_idx": (get("scale_attn_by_inverse_layer_idx", False) is False, "false"),
        "tie_word_embeddings": (get("tie_word_embeddings", True) is True, "true"),
        "add_cross_attention": (get("add_cross_attention", False) is False, "false"),
    }
    for key, (ok, expected) in checks.items():
        if not ok:
            raise ConfigError(f"{source}: {key}={hf.get(key)!r} is not supported by models/gpt.py (expected {expected})")
    d_model, n_heads = int(get("n_embd")), int(get("n_head"))
    if d_model % n_heads:
        raise ConfigError(f"{source}: n_embd={d_model} is not divisible by n_head={n_heads}")
    max_len = int(get("n_positions", hf.get("n_ctx")))
    attn = attention.default_config()
    attn.block_size = math.gcd(attn.block_size, max_len)  # the kernel tile must divide the context
    return ml_collections.ConfigDict(dict(
        size="hf_gpt2", nominal_params=0.0, vocab_size=int(get("vocab_size")), max_len=max_len,
        n_layers=int(get("n_layer")), d_model=d_model, n_heads=n_heads, d_head=d_model // n_heads,
        d_ff=int(hf.get("n_inner") or 4 * d_model), embd_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0,
        dtype="float32", remat="none", vocab_pad_multiple=128, attention=attn,
    ))


def hf_config_from_model(cfg: gpt.GPTConfig, eos_token_id: int | None = None) -> dict:
    """A GPT-2 config.json for our model; ConfigError for what GPT-2 cannot express."""
    if cfg.n_heads * cfg.d_head != cfg.d_model:
        raise ConfigError(f"model.n_heads·model.d_head={cfg.n_heads * cfg.d_head} != model.d_model={cfg.d_model}: "
                          "GPT-2 has no separate attention width")
    layers = {attention.layer_pattern(cfg.attention, i) for i in range(cfg.n_layers)}
    if layers != {"dense"}:
        raise ConfigError(f"model.attention.layers={cfg.attention.layers!r}: GPT-2 attention is dense only")
    eos = cfg.vocab_size - 1 if eos_token_id is None else int(eos_token_id)
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.max_len, "n_ctx": cfg.max_len,
        "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
        "n_inner": None if cfg.d_ff == 4 * cfg.d_model else cfg.d_ff,
        "activation_function": "gelu_new", "layer_norm_epsilon": LAYER_NORM_EPSILON,
        "resid_pdrop": cfg.resid_dropout, "embd_pdrop": cfg.embd_dropout, "attn_pdrop": cfg.attn_dropout,
        "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True,
        "bos_token_id": eos, "eos_token_id": eos,
    }


# ------------------------------------------------------------------------------ parameters


def _layer_names(cfg: gpt.GPTConfig, i: int) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """HF name (no prefix) -> (our path, our shape) for block i."""
    d, h, e, f = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_ff
    ours = f"h_{i}"
    return {
        f"h.{i}.ln_1.weight": ((ours, "ln_1", "scale"), (d,)),
        f"h.{i}.ln_1.bias": ((ours, "ln_1", "bias"), (d,)),
        f"h.{i}.attn.c_attn.weight": ((ours, "attn", "qkv", "kernel"), (d, 3, h, e)),
        f"h.{i}.attn.c_attn.bias": ((ours, "attn", "qkv", "bias"), (3, h, e)),
        f"h.{i}.attn.c_proj.weight": ((ours, "attn", "out", "kernel"), (h, e, d)),
        f"h.{i}.attn.c_proj.bias": ((ours, "attn", "out", "bias"), (d,)),
        f"h.{i}.ln_2.weight": ((ours, "ln_2", "scale"), (d,)),
        f"h.{i}.ln_2.bias": ((ours, "ln_2", "bias"), (d,)),
        f"h.{i}.mlp.c_fc.weight": ((ours, "mlp", "fc", "kernel"), (d, f)),
        f"h.{i}.mlp.c_fc.bias": ((ours, "mlp", "fc", "bias"), (f,)),
        f"h.{i}.mlp.c_proj.weight": ((ours, "mlp", "proj", "kernel"), (f, d)),
        f"h.{i}.mlp.c_proj.bias": ((ours, "mlp", "proj", "bias"), (d,)),
    }


def name_map(cfg: gpt.GPTConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """Every HF GPT-2 tensor name (without "transformer.") -> (our parameter path, our shape)."""
    names = {
        "wte.weight": (("wte", "embedding"), (cfg.padded_vocab, cfg.d_model)),
        "wpe.weight": (("wpe", "embedding"), (cfg.max_len, cfg.d_model)),
        "ln_f.weight": (("ln_f", "scale"), (cfg.d_model,)),
        "ln_f.bias": (("ln_f", "bias"), (cfg.d_model,)),
    }
    for i in range(cfg.n_layers):
        names.update(_layer_names(cfg, i))
    return names


def _hf_shape(name: str, ours: tuple[int, ...], cfg: gpt.GPTConfig) -> tuple[int, ...]:
    """The shape HF stores for `name` whose shape here is `ours`."""
    if name == "wte.weight":
        return (cfg.vocab_size, cfg.d_model)
    if name.endswith("c_attn.weight"):  # [d, 3, H, D] <- [d, 3d]
        return (ours[0], math.prod(ours[1:]))
    if name.endswith("c_attn.bias"):  # [3, H, D] <- [3d]
        return (math.prod(ours),)
    if name.endswith("attn.c_proj.weight"):  # [H, D, d] <- [d, d]
        return (math.prod(ours[:-1]), ours[-1])
    return ours


def normalize_hf_state(state: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Drops the "transformer." prefix and the causal-mask buffers; checks a stored lm_head is tied."""
    out = {}
    for name, value in state.items():
        name = name.removeprefix(HF_PREFIX)
        if name.endswith(BUFFER_SUFFIXES):
            continue
        out[name] = value
    lm_head = out.pop("lm_head.weight", None)
    if lm_head is not None and ("wte.weight" not in out or not np.array_equal(lm_head, out["wte.weight"])):
        raise CheckpointError(f"{source}: lm_head.weight differs from wte.weight; our unembedding is tied")
    return out


def params_from_hf_state(state: dict[str, np.ndarray], cfg: gpt.GPTConfig, source: str = WEIGHTS_FILE) -> dict:
    """Our float32 parameter tree from HF GPT-2 tensors; CheckpointError naming a missing, extra or misshapen key."""
    state = normalize_hf_state(state, source)
    names = name_map(cfg)
    extra = sorted(set(state) - set(names))
    if extra:
        raise CheckpointError(f"{source}: unexpected tensors {extra[:4]} for a {cfg.n_layers}-layer GPT-2")
    params: dict = {}
    for name, (path, shape) in names.items():
        if name not in state:
            raise CheckpointError(f"{source}: no tensor {name!r}")
        value = np.asarray(state[name], np.float32)
        if value.shape != _hf_shape(name, shape, cfg):
            raise CheckpointError(f"{source}: {name} has shape {value.shape}, expected {_hf_shape(name, shape, cfg)} "
                                  "for this config")
        if name == "wte.weight":
            value = np.concatenate([value, np.zeros((cfg.padded_vocab - cfg.vocab_size, cfg.d_model), np.float32)])
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value.reshape(shape)
    return params


def hf_state_from_params(params, cfg: gpt.GPTConfig) -> dict[str, np.ndarray]:
    """HF GPT-2 tensors ("transformer." names, float32, padded vocabulary rows dropped) from our parameters."""
    params = jax.device_get(params)
    state = {}
    for name, (path, shape) in name_map(cfg).items():
        value = params
        for key in path:
            value = value[key]
        value = np.asarray(value, np.float32)
        if value.shape != shape:
            raise CheckpointError(f"parameter {'/'.join(path)} has shape {value.shape}, expected {shape} for this config")
        if name == "wte.weight":
            value = value[:cfg.vocab_size]
        state[HF_PREFIX + name] = np.ascontiguousarray(value.reshape(_hf_shape(name, shape, cfg)))
    return state


# ------------------------------------------------------------------------------ directories


def load_safetensors(path: str) -> dict[str, np.ndarray]:
    """Tensors of one safetensors file as numpy arrays; bfloat16 ones (which numpy cannot name) via JAX on the host."""
    try:
        return st_numpy.load_file(path)
    except TypeError:
        from safetensors import flax as st_flax

        with jax.default_device(jax.devices("cpu")[0]):
            return {k: np.asarray(v) for k, v in st_flax.load_file(path).items()}


def read_hf_weights(hf_dir: str) -> dict[str, np.ndarray]:
    """All tensors of model.safetensors, or of the shards model.safetensors.index.json lists."""
    single, index = os.path.join(hf_dir, WEIGHTS_FILE), os.path.join(hf_dir, WEIGHTS_INDEX_FILE)
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        weight_map = _read_json(index, CheckpointError).get("weight_map", {})
        files = [os.path.join(hf_dir, f) for f in sorted(set(weight_map.values()))]
    else:
        raise CheckpointError(f"{hf_dir}: no {WEIGHTS_FILE} (nor {WEIGHTS_INDEX_FILE}); only safetensors are read")
    state = {}
    for path in files:
        try:
            state.update(load_safetensors(path))
        except (OSError, SafetensorError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: cannot read it as safetensors ({e})") from e
    return state


def import_hf_gpt2(hf_dir: str) -> tuple[dict, ml_collections.ConfigDict]:
    """(our parameters, our model config) from a HF GPT-2 directory (config.json + model.safetensors)."""
    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"{hf_dir}: no such directory")
    config_path = os.path.join(hf_dir, CONFIG_FILE)
    model_cfg = model_config_from_hf(_read_json(config_path), config_path)
    cfg = gpt.GPTConfig.from_config(model_cfg)
    return params_from_hf_state(read_hf_weights(hf_dir), cfg, os.path.join(hf_dir, WEIGHTS_FILE)), model_cfg


def export_hf_gpt2(params, model_cfg, out_dir: str, eos_token_id: int | None = None) -> None:
    """Writes OUT_DIR/config.json and OUT_DIR/model.safetensors that transformers' GPT2LMHeadModel loads.
    eos_token_id defaults to the last vocabulary entry (GPT-2's <|endoftext|>)."""
    cfg = model_cfg if isinstance(model_cfg, gpt.GPTConfig) else gpt.GPTConfig.from_config(model_cfg)
    hf_config = hf_config_from_model(cfg, eos_token_id)
    state = hf_state_from_params(params, cfg)
    os.makedirs(out_dir, exist_ok=True)
    st_numpy.save_file(state, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2)


# ------------------------------------------------------------------------------ workdirs


def config_overrides(model_cfg: ml_collections.ConfigDict, hf_dir: str | None = None) -> list[str]:
    """The --config flags that make a stage's model match an imported one (train.seq_len: the whole context,
    lower it at will), and GPT-2's tokenizer when hf_dir holds its files."""
    keys = ("vocab_size", "max_len", "n_layers", "d_model", "n_heads", "d_head", "d_ff")
    flags = [f"--config.model.{k}={model_cfg[k]}" for k in keys]
    flags += [f"--config.model.attention.block_size={model_cfg.attention.block_size}",
              f"--config.train.seq_len={model_cfg.max_len}"]
    if hf_dir is not None:
        try:
            gpt2_bpe_files(hf_dir)
            flags += ["--config.tokenizer.kind=gpt2_bpe", f"--config.tokenizer.path={os.path.abspath(hf_dir)}"]
        except ConfigError:  # no tokenizer files there: the user names them
            pass
    return flags


def write_params_workdir(workdir: str, params, model_cfg: ml_collections.ConfigDict) -> None:
    """A workdir a later stage can name in init.params: checkpoints/0 holding {"params"} plus config.json."""
    from instructgpt_jax.train.checkpoint import Checkpointer

    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG_FILE), "w", encoding="utf-8") as f:
        f.write(ml_collections.ConfigDict({"stage": "hf_import", "model": model_cfg}).to_json_best_effort(indent=2))
    checkpointer = Checkpointer(workdir, keep=1, async_save=False)
    checkpointer.save(0, {"params": jax.tree.map(np.asarray, params)})
    checkpointer.close()


def workdir_eos_id(saved_config: dict) -> int:
    """The eos id of the tokenizer a workdir's config.json names: SentencePiece's fixed id, or GPT-2's
    <|endoftext|> (the last vocabulary entry) for gpt2_bpe and for an imported GPT-2."""
    tokenizer = saved_config.get("tokenizer")
    if tokenizer is not None and tokenizer.get("kind", "sentencepiece") == "sentencepiece":
        return EOS_ID
    return int(saved_config["model"]["vocab_size"]) - 1


def read_params_workdir(workdir: str) -> tuple[dict, ml_collections.ConfigDict, int]:
    """(params of the latest checkpoint, model config, eos id) of a pretrain/SFT/PPO-policy or imported workdir."""
    from instructgpt_jax.train.checkpoint import load_params

    config_path = os.path.join(workdir, CONFIG_FILE)
    saved = _read_json(config_path, CheckpointError)
    if "model" not in saved:
        raise CheckpointError(f"{config_path}: no 'model' section")
    model_cfg = ml_collections.ConfigDict(saved["model"])
    cfg = gpt.GPTConfig.from_config(model_cfg)
    shapes = jax.eval_shape(lambda: gpt.GPT(cfg).init(jax.random.key(0), np.zeros((1, 1), np.int32)))["params"]
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), nn.meta.unbox(shapes))
    return load_params(workdir, abstract), model_cfg, workdir_eos_id(saved)


def main(argv: list[str]) -> int:
    usage = ("usage: python -m instructgpt_jax.interop.hf_gpt2 import HF_DIR WORKDIR\n"
             "       python -m instructgpt_jax.interop.hf_gpt2 export WORKDIR OUT_DIR [EOS_TOKEN_ID]")
    if len(argv) not in (3, 4) or argv[0] not in ("import", "export") or (argv[0] == "import" and len(argv) != 3):
        print(usage, file=sys.stderr)
        return 2
    try:
        if argv[0] == "import":
            params, model_cfg = import_hf_gpt2(argv[1])
            write_params_workdir(argv[2], params, model_cfg)
            print(f"wrote {argv[2]}; start a stage from it with --config.init.params={os.path.abspath(argv[2])} "
                  + " ".join(config_overrides(model_cfg, argv[1])))
        else:
            params, model_cfg, eos_id = read_params_workdir(argv[1])
            export_hf_gpt2(params, model_cfg, argv[2], int(argv[3]) if len(argv) == 4 else eos_id)
            print(f"wrote {argv[2]}/{CONFIG_FILE} and {argv[2]}/{WEIGHTS_FILE}")
    except UserError as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
