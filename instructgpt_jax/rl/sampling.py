"""Autoregressive sampling with the KV cache: temperature, top-k, nucleus (top-p), EOS per sequence.

Prompts are left-padded to one length P, so every sequence's next token lands in the same column;
position ids count only the real tokens (cumsum(mask) - 1) and padding keys are masked out. The
prompt is run once (prefill), then one token per step in a `lax.while_loop` that stops when every
sequence has emitted EOS or after `max_new_tokens`. Temperature and top-p are traced scalars (changing
them never recompiles); top-k and the number of new tokens are static. Randomness comes only from the
rng passed in (step i draws with fold_in(rng, i)), so a seed gives the same tokens on 1 or 8 devices.

`full_recompute_sample` re-runs the whole prefix at every step, without a cache: the tests' oracle
and the benchmark's baseline.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from instructgpt_jax.data.tokenizer import EOS_ID, PAD_ID
from instructgpt_jax.models import gpt
from instructgpt_jax.train import sharding


@flax.struct.dataclass
class SampleOutput:
    tokens: jax.Array         # [B, P+N] int32: the left-padded prompt, then the response
    response: jax.Array       # [B, N] int32: sampled tokens, pad after EOS
    response_mask: jax.Array  # [B, N] float32: 1 up to and including EOS
    logprobs: jax.Array       # [B, N] float32: log softmax(logits / temperature) of the token, 0 where masked
    ended: jax.Array          # [B] bool: emitted EOS
    lengths: jax.Array        # [B] int32: response tokens, EOS included


# ---------------------------------------------------------------- host-side helpers

def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int = PAD_ID):
    """Token-id lists -> (tokens int32 [B, length], mask bool [B, length]), right-aligned; a prompt
    longer than `length` keeps its last `length` tokens (the ones next to the response)."""
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for row, prompt in enumerate(prompts):
        kept = list(prompt)[-length:]
        if not kept:
            raise ValueError(f"prompt {row} is empty; start it with a token (e.g. BOS) to condition on")
        tokens[row, length - len(kept):] = kept
        mask[row, length - len(kept):] = True
    return tokens, mask


def decode_responses(tokenizer, output: SampleOutput) -> tuple[list[str], list[bool]]:
    """Response strings (up to EOS, padding dropped) and whether each emitted EOS."""
    responses, ended = jax.device_get((output.response, output.ended))
    return [tokenizer.decode(row) for row in responses], [bool(e) for e in ended]


# ---------------------------------------------------------------- choosing the next token

def nucleus_threshold(sorted_desc, top_p):
    """Smallest kept value of the nucleus (Holtzman et al. 2020): the shortest run of most likely
    tokens whose probability reaches top_p. sorted_desc [B, K] scaled logits, largest first."""
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_kept = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1, keepdims=True), 1)
    return jnp.take_along_axis(sorted_desc, n_kept - 1, axis=-1)


def truncated_logits(scaled, top_p, top_k: int):
    """scaled [B, V] with tokens outside the top-k, then outside the nucleus, set to -inf."""
    drop = lambda threshold: jnp.where(scaled >= threshold, scaled, -jnp.inf)  # noqa: E731
    if top_k:
        candidates = jax.lax.top_k(scaled, top_k)[0]  # nucleus renormalised within the top-k, as HF does
        return jnp.where(scaled >= candidates[:, -1:], drop(nucleus_threshold(candidates, top_p)), -jnp.inf)
    # A full-vocabulary sort per step is skipped at run time when top_p >= 1.
    return jax.lax.cond(top_p < 1.0, lambda: drop(nucleus_threshold(-jnp.sort(-scaled, axis=-1), top_p)),
                        lambda: scaled)


def choose_tokens(logits, rng, temperature, top_p, top_k: int = 0):
    """Next tokens [B] and their log-probabilities [B] under softmax(logits / temperature).

    The log-probabilities ignore the top-k/top-p truncation: PPO's policy is the full tempered
    distribution. Temperature 0 is greedy (argmax), scored at temperature 1."""
    greedy = temperature <= 0.0
    scaled = logits / jnp.where(greedy, 1.0, temperature)
    drawn = jax.random.categorical(rng, truncated_logits(scaled, top_p, top_k), axis=-1)
    tokens = jnp.where(greedy, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens, logprobs


# ---------------------------------------------------------------- the model, prefill and one step

def positions_from_mask(valid):
    """Position ids counting only real tokens: left padding does not shift the prompt."""
    return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)


def last_logits(model: gpt.GPT, params, hidden):
    """Logits [B, V] of the last column only (never the [B, T, V] tensor of the whole prompt)."""
    return model.apply({"params": params}, hidden[:, -1:], method="unembed")[:, 0]


def check_fits(model: gpt.GPT, prompt_len: int, max_new_tokens: int) -> None:
    if prompt_len + max_new_tokens > model.cfg.max_len:
        raise ValueError(f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} exceeds "
                         f"model.max_len={model.cfg.max_len} (the position table)")


def empty_cache(model: gpt.GPT, batch_size: int, length: int):
    """A KV cache of `length` slots rather than max_len: decode attention reads every slot each step."""
    return gpt.init_cache(model.clone(cfg=dataclasses.replace(model.cfg, max_len=length)), batch_size)


def run_cached(model: gpt.GPT, params, cache, tokens, positions, valid):
    """Appends tokens [B, T] to the cache; returns the last column's logits and the new cache."""
    hidden, variables = model.apply({"params": params, "cache": cache}, tokens, positions, valid,
                                    decode=True, return_hidden=True, mutable=["cache"])
    return last_logits(model, params, hidden), variables["cache"]


class Responses(NamedTuple):
    """What the loop has written so far; column i is filled by step i."""
    tokens: jax.Array    # [B, N]
    live: jax.Array      # [B, N] bool: before (or at) EOS
    logprobs: jax.Array  # [B, N]
    done: jax.Array      # [B] bool: EOS emitted

    @classmethod
    def empty(cls, batch: int, n: int, pad_id: int):
        return cls(jnp.full((batch, n), pad_id, jnp.int32), jnp.zeros((batch, n), bool),
                   jnp.zeros((batch, n), jnp.float32), jnp.zeros((batch,), bool))

    def record(self, step, tokens, logprobs, eos_id: int, pad_id: int) -> "Responses":
        """Writes column `step`: finished sequences get pad, mask 0, logprob 0."""
        live = ~self.done
        tokens = jnp.where(live, tokens, pad_id)
        write = lambda buf, col: jax.lax.dynamic_update_index_in_dim(buf, col, step, axis=1)  # noqa: E731
        return Responses(write(self.tokens, tokens), write(self.live, live),
                         write(self.logprobs, jnp.where(live, logprobs, 0.0)), self.done | (tokens == eos_id))

    def output(self, prompt_tokens) -> SampleOutput:
        return SampleOutput(tokens=jnp.concatenate([prompt_tokens.astype(jnp.int32), self.tokens], axis=1),
                            response=self.tokens, response_mask=self.live.astype(jnp.float32),
                            logprobs=self.logprobs, ended=self.done,
                            lengths=self.live.sum(axis=-1).astype(jnp.int32))


class DecodeState(NamedTuple):
    step: jax.Array       # next response column to fill
    cache: dict
    logits: jax.Array     # [B, V] for column `step`
    position: jax.Array   # [B] position id of the token fed next (the one in column step - 1)
    responses: Responses


def sample(model: gpt.GPT, params, prompt_tokens, prompt_mask, rng, temperature, top_p, *,
           max_new_tokens: int, top_k: int = 0, eos_id: int = EOS_ID, pad_id: int = PAD_ID) -> SampleOutput:
    """KV-cache sampling of up to max_new_tokens after left-padded prompts [B, P] (traceable, unjitted)."""
    batch, prompt_len = prompt_tokens.shape
    check_fits(model, prompt_len, max_new_tokens)
    if not 0 <= top_k <= model.cfg.vocab_size:
        raise ValueError(f"top_k={top_k} must be in [0, vocab_size={model.cfg.vocab_size}] (0 = off)")
    valid = prompt_mask.astype(bool)
    positions = positions_from_mask(valid)
    cache = empty_cache(model, batch, prompt_len + max_new_tokens)
    logits, cache = run_cached(model, params, cache, prompt_tokens, positions, valid)

    def choose(step, logits):
        return choose_tokens(logits, jax.random.fold_in(rng, step), temperature, top_p, top_k)

    def unfinished(state: DecodeState):
        return (state.step < max_new_tokens) & ~jnp.all(state.responses.done)

    def decode_step(state: DecodeState) -> DecodeState:
        fed = jax.lax.dynamic_index_in_dim(state.responses.tokens, state.step - 1, axis=1)
        fed_live = jax.lax.dynamic_index_in_dim(state.responses.live, state.step - 1, axis=1)
        logits, cache = run_cached(model, params, state.cache, fed, state.position[:, None], fed_live)
        responses = state.responses.record(state.step, *choose(state.step, logits), eos_id, pad_id)
        return DecodeState(state.step + 1, cache, logits, state.position + 1, responses)

    first = Responses.empty(batch, max_new_tokens, pad_id).record(0, *choose(0, logits), eos_id, pad_id)
    state = DecodeState(jnp.int32(1), cache, logits, valid.sum(axis=-1).astype(jnp.int32), first)
    return jax.lax.while_loop(unfinished, decode_step, state).responses.output(prompt_tokens)


def full_recompute_sample(model: gpt.GPT, params, prompt_tokens, prompt_mask, rng, temperature, *,
                          max_new_tokens: int, eos_id: int = EOS_ID, pad_id: int = PAD_ID) -> SampleOutput:
    """Same draws as `sample` (top-k/top-p off) without a cache: every step runs the model over the
    whole fixed-shape [B, P+N] buffer. The oracle for `sample` and the benchmark's baseline."""
    batch, prompt_len = prompt_tokens.shape
    check_fits(model, prompt_len, max_new_tokens)
    tokens = jnp.concatenate([prompt_tokens.astype(jnp.int32), jnp.full((batch, max_new_tokens), pad_id, jnp.int32)], 1)
    valid = jnp.concatenate([prompt_mask.astype(bool), jnp.zeros((batch, max_new_tokens), bool)], axis=1)

    def step(carry, i):
        tokens, valid, responses = carry
        hidden = model.apply({"params": params}, tokens, positions_from_mask(valid), valid, return_hidden=True)
        logits = last_logits(model, params, jax.lax.dynamic_slice_in_dim(hidden, prompt_len + i - 1, 1, axis=1))
        new, logprobs = choose_tokens(logits, jax.random.fold_in(rng, i), temperature, 1.0)
        responses = responses.record(i, new, logprobs, eos_id, pad_id)
        column = prompt_len + i
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, responses.tokens[:, i], column, axis=1)
        valid = jax.lax.dynamic_update_index_in_dim(valid, responses.live[:, i], column, axis=1)
        return (tokens, valid, responses), None

    empty = Responses.empty(batch, max_new_tokens, pad_id)
    (_, _, responses), _ = jax.lax.scan(step, (tokens, valid, empty), jnp.arange(max_new_tokens))
    return responses.output(prompt_tokens)


def make_sampler(config, model: gpt.GPT, mesh, *, max_new_tokens: int, top_k: int = 0, params_shardings=None,
                 eos_id: int = EOS_ID, pad_id: int = PAD_ID):
    """Jitted `(params, prompt_tokens, prompt_mask, rng, temperature, top_p) -> SampleOutput` on `mesh`:
    batch split over (data, fsdp), params as `params_shardings` (default replicated), scalars replicated.
    Each prompt shape compiles once; new temperature/top_p values reuse the compilation."""
    fn = functools.partial(sample, model, max_new_tokens=max_new_tokens, top_k=top_k, eos_id=eos_id, pad_id=pad_id)
    batch, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    params_shardings = replicated if params_shardings is None else params_shardings
    jitted = jax.jit(fn, in_shardings=(params_shardings, batch, batch, replicated, replicated, replicated),
                     out_shardings=batch)
    in_context = sharding.with_sharding_context(jitted, mesh, sharding.rules(config))

    def sampler(params, prompt_tokens, prompt_mask, rng, temperature, top_p) -> SampleOutput:
        # float32 arrays whatever the caller passes: a Python float (weakly typed) would be a new compilation.
        return in_context(params, prompt_tokens, prompt_mask, rng, jnp.float32(temperature), jnp.float32(top_p))

    sampler.__wrapped__ = jitted
    return sampler
