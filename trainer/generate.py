"""Greedy decoding for evaluation, correct before fast: every new token recomputes the whole prefix
with one fixed-shape forward pass (no KV cache), which is fine at the tiny model's scale.

Prompts are left-aligned in a [rows, prompt + new] buffer; causality makes the not-yet-written tail
irrelevant to the positions before it, so one compiled program serves every step.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec


def _place(host: np.ndarray, sharding):
    """`host` as a global array with `sharding`, each process filling its own devices (or as is for None)."""
    return host if sharding is None else jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def make_greedy_generate(graphdef, params, routing, *, max_new_tokens: int, batch_rows: int,
                         max_prompt_len: int, stop_id: int, batch_sharding=None):
    """-> generate(prompts: list of int32 arrays) -> list of generated id lists (stopping after
    `stop_id`). `batch_rows` rows run at once (a multiple of the batch's shard count).

    On a multi-process mesh every process calls `generate` with the same prompts: each places its
    devices' rows of the buffer, and the new tokens come back replicated, readable everywhere."""
    length = max_prompt_len + max_new_tokens
    replicated = None if batch_sharding is None else NamedSharding(batch_sharding.mesh, PartitionSpec())

    @functools.partial(jax.jit, out_shardings=replicated)
    def next_tokens(params, routing, buffer, lengths):
        logits = nnx.merge(graphdef, params, routing)(buffer).logits  # [rows, length, vocab]
        last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
        return jnp.argmax(last, axis=-1).astype(jnp.int32)

    if batch_sharding is not None:
        # Compiled here rather than at the first call, so that a multi-process caller can wait for
        # every process to finish compiling before the first collective (trainer.distributed.barrier).
        next_tokens = next_tokens.lower(
            params, routing, jax.ShapeDtypeStruct((batch_rows, length), jnp.int32, sharding=batch_sharding),
            jax.ShapeDtypeStruct((batch_rows,), jnp.int32, sharding=replicated)).compile()

    def generate(prompts):
        results = []
        for start in range(0, len(prompts), batch_rows):
            chunk = prompts[start:start + batch_rows]
            buffer = np.zeros((batch_rows, length), np.int32)
            lengths = np.ones((batch_rows,), np.int32)
            for row, prompt in enumerate(chunk):
                if len(prompt) > max_prompt_len:
                    raise ValueError(f"prompt {start + row} has {len(prompt)} tokens, more than "
                                     f"max_prompt_len={max_prompt_len}")
                buffer[row, :len(prompt)] = prompt
                lengths[row] = len(prompt)
            done = np.zeros((batch_rows,), bool)
            done[len(chunk):] = True
            outputs = [[] for _ in chunk]
            for _ in range(max_new_tokens):
                token = np.asarray(next_tokens(params, routing, _place(buffer, batch_sharding),
                                               _place(lengths, replicated)))
                for row in np.flatnonzero(~done):
                    outputs[row].append(int(token[row]))
                    buffer[row, lengths[row]] = token[row]
                    lengths[row] += 1
                    done[row] = token[row] == stop_id
                if done.all():
                    break
            results.extend(outputs)
        return results

    return generate
