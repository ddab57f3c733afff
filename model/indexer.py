"""Lightning indexer: picks, per query, the top-k compressed entries a CSA layer attends to.

Scores are I[t, s] = sum_h w_h(t) * relu(q_h(t) . K_s) over a narrow multi-head query and a separate
narrow compressor. Each query selects exactly `index_topk` of its visible entries; entries often tie
(at 0, when every head's dot product is negative), and ties go to the lowest index. Selection is
discrete, so the main loss sends no gradient through it.

The indexer has its own objective, as DeepSeek trains it in sparse training (DeepSeek-V3.2's DSA,
which V4's CSA follows): per query, KL(p || softmax(I)) over the selected entries, where p is the main
attention's probabilities of those entries summed over its heads and L1-normalised (`attention_kl`).
Its inputs are detached from the main model and p is a constant to it, so this loss trains the
indexer (its projections and its own compressor) and nothing else, and the main loss never reaches it.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from mesh.sharding import shard_local
from model import params, rope
from model.args import ModelArgs
from model.compressor import Compressor


class Indexer(nnx.Module):
    def __init__(self, args: ModelArgs, ratio: int, rngs: nnx.Rngs):
        self.topk, self.ratio = args.index_topk, ratio
        self.heads, self.dim = args.index_n_heads, args.index_head_dim
        wdt = args.weight_dtype
        self.wq_b = params.normal(
            rngs,
            (args.q_lora_rank, self.heads, self.dim),
            ("q_lora", "index_heads", "index_head_dim"),
            args.initializer_range,
            wdt,
        )
        self.weights_proj = params.normal(
            rngs, (args.hidden_size, self.heads), ("embed", "index_heads"), args.initializer_range, wdt
        )
        self.compressor = Compressor(args, self.dim, ratio, overlap=True, norm_name="index_head_dim", rngs=rngs)
        self.args = args

    def __call__(
        self, u: jax.Array, q_latent: jax.Array, positions: jax.Array, segment_ids: jax.Array, visible: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """u [b,s,d], q_latent [b,s,q_lora], positions/segment_ids [b,s], visible [b,s,n] (entries the
        query may use) -> (selected [b,s,n] bool, the index scores I [b,s,n] float32, -inf where not
        visible: differentiable in the indexer's parameters, for `attention_kl`)."""
        u, q_latent = jax.lax.stop_gradient(u), jax.lax.stop_gradient(q_latent)
        keys = self.compressor(u, positions, segment_ids).values  # [b, n, dim]
        n = keys.shape[1]
        q = jnp.einsum("bsr,rhc->bshc", q_latent.astype(jnp.float32), self.wq_b[...].astype(jnp.float32))
        q = rope.rotate(q, positions[..., None], rope.inverse_frequencies(self.args, compressed=True))
        scores = jax.nn.relu(jnp.einsum("bshc,bnc->bshn", q, keys)) * (self.dim**-0.5)
        head_weights = jnp.einsum("bsd,dh->bsh", u.astype(jnp.float32), self.weights_proj[...].astype(jnp.float32)) * (
            self.heads**-0.5
        )
        index = jnp.einsum("bsh,bshn->bsn", head_weights, scores)
        index = jnp.where(visible, index, -jnp.inf)
        if n == 0:
            return visible, index
        selected = shard_local(
            lambda i: top_k_mask(jax.lax.stop_gradient(i), min(self.topk, n)), ("act_batch", "act_length"), index
        )
        return visible & selected, index


def top_k_mask(index: jax.Array, k: int) -> jax.Array:
    """[..., n] scores -> [..., n] bool marking exactly k entries per row: the k largest, and among
    equal scores the lowest indices (jax.lax.top_k's rule; torch.topk breaks ties arbitrarily)."""
    _, chosen = jax.lax.top_k(index, k)
    return jnp.put_along_axis(jnp.zeros(index.shape, bool), chosen, True, axis=-1, inplace=False)


def attention_kl(attended: jax.Array, index: jax.Array, selected: jax.Array) -> jax.Array:
    """The indexer's loss per query: KL(p || softmax of the index over the selected entries).

    attended [b,s,n]: the main attention's probabilities of the compressed entries summed over its
    heads (a constant here: detach it first); p is that over the selected entries, L1-normalised.
    index [b,s,n] the indexer's scores, selected [b,s,n] bool -> [b,s] float32, 0 for a query without
    selected entries (padding, or no complete block yet)."""
    attended = jnp.where(selected, attended.astype(jnp.float32), 0.0)
    total = jnp.sum(attended, axis=-1, keepdims=True)
    p = attended / jnp.where(total > 0, total, 1.0)
    some = jnp.any(selected, axis=-1, keepdims=True)
    log_q = jax.nn.log_softmax(jnp.where(some, jnp.where(selected, index, -jnp.inf), 0.0), axis=-1)
    positive = p > 0
    terms = p * (jnp.log(jnp.where(positive, p, 1.0)) - jnp.where(positive, log_q, 0.0))
    return jnp.sum(jnp.where(positive, terms, 0.0), axis=-1)
