"""Autoregressive sampling from the model on its mesh: temperature, nucleus (top-p), stop tokens.

Correct before fast: every new token recomputes the whole prefix (no KV cache), fine at the tiny model's
scale; a large model samples with an inference engine (data/rollouts.py). One compiled program serves
every step, temperature and top-p. The model distribution and the sampling distribution are both
returned for the sampled token (GRPO's ratio uses the latter). Invariant: row r's draw at step t uses
fold_in(fold_in(key, r), t), so a row's sample does not depend on `batch_rows` or the other rows.
The nucleus rule and the two distributions: docs/training.md.
"""

import dataclasses
import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec


@dataclasses.dataclass(frozen=True)
class Completion:
    """One sampled continuation of a prompt; the three arrays have one entry per sampled token."""

    ids: np.ndarray  # int32[n], the stop token included when one ended the row
    sampling_logprobs: np.ndarray  # float32[n], log-prob of each id under the sampling distribution
    model_logprobs: np.ndarray  # float32[n], log-prob of each id under the model (T=1, no top-p)
    stopped: bool  # a stop token ended it (False: max_new_tokens did)


def nucleus_mask(log_probs: jax.Array, top_p) -> jax.Array:
    """log_probs [..., V] of a normalised distribution -> bool [..., V]: True inside the nucleus (see
    the module docstring). The edge is the smallest kept probability: the top tokens in sorted order
    are kept while the mass before them is below top_p, then every token at least that likely."""
    probs = jnp.exp(log_probs)
    descending = -jnp.sort(-probs, axis=-1)  # [..., V]
    mass_before = jnp.cumsum(descending, axis=-1) - descending
    kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # [..., 1], >= 1 for top_p > 0
    edge = jnp.take_along_axis(descending, kept - 1, axis=-1)
    return (probs >= edge) | (top_p >= 1.0)


def sampling_log_probs(logits: jax.Array, temperature, top_p) -> jax.Array:
    """logits [..., V] -> log-probs [..., V] of the sampling distribution (-inf outside the nucleus;
    at temperature 0, 0 on the argmax and -inf elsewhere). temperature and top_p may be traced."""
    logits = logits.astype(jnp.float32)
    greedy = temperature <= 0
    tempered = logits / jnp.where(greedy, 1.0, temperature)
    inside = nucleus_mask(jax.nn.log_softmax(tempered, axis=-1), top_p)
    sampled = jax.nn.log_softmax(jnp.where(inside, tempered, -jnp.inf), axis=-1)
    argmax = jnp.argmax(logits, axis=-1)[..., None]
    point = jnp.where(jnp.arange(logits.shape[-1]) == argmax, 0.0, -jnp.inf)
    return jnp.where(greedy, point, sampled)


def draw(logits: jax.Array, keys: jax.Array, temperature, top_p):
    """logits [rows, V], keys [rows] -> (tokens int32[rows], sampling log-probs float32[rows], model
    log-probs float32[rows]) of one token per row from the sampling distribution."""
    log_probs = sampling_log_probs(logits, temperature, top_p)  # [rows, V]
    tokens = jax.vmap(jax.random.categorical)(keys, log_probs).astype(jnp.int32)
    pick = lambda table: jnp.take_along_axis(table, tokens[:, None], axis=-1)[:, 0]
    return tokens, pick(log_probs), pick(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))


# sample(params, routing, prompts, *, stop_ids, key=None, temperature=1.0, top_p=1.0) -> one Completion
# per prompt
SampleFn = Callable[..., list[Completion]]


def _place(host: np.ndarray, sharding):
    """`host` as a global array with `sharding`, each process filling its own devices (as is for None)."""
    return host if sharding is None else jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _replicated(batch_sharding):
    return None if batch_sharding is None else NamedSharding(batch_sharding.mesh, PartitionSpec())


def _next_tokens_program(graphdef, batch_sharding):
    """The jitted decoding step: (params, routing, buffer [rows, length], lengths [rows], key, rows,
    step, temperature, top_p) -> the drawn tokens and their log-probs, replicated."""

    @functools.partial(jax.jit, out_shardings=_replicated(batch_sharding))
    def next_tokens(params, routing, buffer, lengths, key, rows, step, temperature, top_p):
        logits = nnx.merge(graphdef, params, routing)(buffer).logits  # [rows, length, vocab]
        last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [rows, vocab]
        keys = jax.vmap(lambda row: jax.random.fold_in(jax.random.fold_in(key, row), step))(rows)
        return draw(last, keys, temperature, top_p)

    return next_tokens


def compile_next_tokens(graphdef, params, routing, *, batch_rows: int, length: int, batch_sharding):
    """The decoding step compiled for `batch_rows` rows of `length` tokens; `params` and `routing` may
    be abstract (ShapeDtypeStructs with shardings), e.g. for train.py --dry_run."""
    row_ids = jax.ShapeDtypeStruct((batch_rows,), jnp.int32, sharding=_replicated(batch_sharding))
    buffer = jax.ShapeDtypeStruct((batch_rows, length), jnp.int32, sharding=batch_sharding)
    return (
        _next_tokens_program(graphdef, batch_sharding)
        .lower(params, routing, buffer, row_ids, jax.random.key(0), row_ids, np.int32(0), np.float32(0), np.float32(1))
        .compile()
    )


def make_sampler(
    graphdef, *, max_new_tokens: int, batch_rows: int, max_prompt_len: int, batch_sharding=None, compile_with=None
) -> SampleFn:
    """-> sample(params, routing, prompts, *, stop_ids, key=None, temperature=1.0, top_p=1.0): a list
    of Completion, one per prompt (int32[P] arrays).

    What is fixed here shapes the one compiled program (`batch_rows` rows of max_prompt_len +
    max_new_tokens); what `sample` takes can change from call to call without recompiling: the weights
    (a training loop samples with its current ones), the stop ids, temperature, top-p and key.
    `batch_rows` is a multiple of the batch's shard count; `batch_sharding` places the buffer on the
    mesh (call inside `mesh.sharding.activate` for the model's activation rules). A row ends after
    any id in `stop_ids` or after `max_new_tokens`. `key` (a jax.random.key) is required unless
    temperature is 0.

    On a multi-process mesh every process calls `sample` with the same prompts: each places its
    devices' rows of the buffer, and the drawn tokens come back replicated, readable everywhere.
    `compile_with=(params, routing)` compiles the program now rather than at the first call, so that
    such a caller can wait for every process to finish compiling before the first collective
    (trainer.distributed.barrier)."""
    length = max_prompt_len + max_new_tokens
    replicated = _replicated(batch_sharding)
    next_tokens = _next_tokens_program(graphdef, batch_sharding)
    if compile_with is not None:
        next_tokens = compile_next_tokens(
            graphdef, *compile_with, batch_rows=batch_rows, length=length, batch_sharding=batch_sharding
        )

    def sample(
        params,
        routing,
        prompts,
        *,
        stop_ids: Sequence[int],
        key: Optional[jax.Array] = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> list[Completion]:
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        if key is None:
            if temperature > 0:
                raise ValueError("sampling at a temperature above 0 needs a PRNG key")
            key = jax.random.key(0)  # greedy decoding draws nothing: any key gives the same tokens
        stops = np.asarray(sorted(stop_ids), np.int32)
        results = []
        for start in range(0, len(prompts), batch_rows):
            chunk = prompts[start : start + batch_rows]
            buffer = np.zeros((batch_rows, length), np.int32)
            lengths = np.ones((batch_rows,), np.int32)
            for row, prompt in enumerate(chunk):
                if len(prompt) > max_prompt_len:
                    raise ValueError(
                        f"prompt {start + row} has {len(prompt)} tokens, more than max_prompt_len={max_prompt_len}"
                    )
                buffer[row, : len(prompt)] = prompt
                lengths[row] = len(prompt)
            done = np.zeros((batch_rows,), bool)
            done[len(chunk) :] = True
            stopped = np.zeros((batch_rows,), bool)
            rows = np.arange(start, start + batch_rows, dtype=np.int32)
            outputs = [([], [], []) for _ in chunk]  # per row: ids, sampling log-probs, model log-probs
            for step in range(max_new_tokens):
                drawn = next_tokens(
                    params,
                    routing,
                    _place(buffer, batch_sharding),
                    _place(lengths, replicated),
                    key,
                    _place(rows, replicated),
                    np.int32(step),
                    np.float32(temperature),
                    np.float32(top_p),
                )
                token, sampling_lp, model_lp = (np.asarray(a) for a in drawn)
                for row in np.flatnonzero(~done):
                    for values, value in zip(outputs[row], (token, sampling_lp, model_lp)):
                        values.append(value[row])
                    buffer[row, lengths[row]] = token[row]
                    lengths[row] += 1
                    stopped[row] = token[row] in stops
                done |= stopped
                if done.all():
                    break
            results.extend(
                Completion(
                    np.asarray(ids, np.int32),
                    np.asarray(slp, np.float32),
                    np.asarray(mlp, np.float32),
                    bool(stopped[row]),
                )
                for row, (ids, slp, mlp) in enumerate(outputs)
            )
        return results

    return sample
