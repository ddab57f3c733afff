"""Lightning indexer: picks, per query, the top-k compressed entries a CSA layer attends to.

Scores are I[t, s] = sum_h w_h(t) * relu(q_h(t) . K_s) over a narrow multi-head query and a separate
narrow compressor. Each query selects exactly `index_topk` of its visible entries; entries often tie
(at 0, when every head's dot product is negative), and ties go to the lowest index. Selection is
discrete, so the main loss sends no gradient through it.
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
        self.wq_b = params.normal(rngs, (args.q_lora_rank, self.heads, self.dim),
                                  ("q_lora", "index_heads", "index_head_dim"), args.initializer_range, wdt)
        self.weights_proj = params.normal(rngs, (args.hidden_size, self.heads), ("embed", "index_heads"),
                                          args.initializer_range, wdt)
        self.compressor = Compressor(args, self.dim, ratio, overlap=True, norm_name="index_head_dim", rngs=rngs)
        self.args = args

    def __call__(self, u: jax.Array, q_latent: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                 visible: jax.Array) -> jax.Array:
        """u [b,s,d], q_latent [b,s,q_lora], positions/segment_ids [b,s], visible [b,s,n] (entries the
        query may use) -> selected [b,s,n] bool."""
        u, q_latent = jax.lax.stop_gradient(u), jax.lax.stop_gradient(q_latent)
        keys = self.compressor(u, positions, segment_ids).values  # [b, n, dim]
        n = keys.shape[1]
        q = jnp.einsum("bsr,rhc->bshc", q_latent.astype(jnp.float32), self.wq_b[...].astype(jnp.float32))
        q = rope.rotate(q, positions[..., None], rope.inverse_frequencies(self.args, compressed=True))
        scores = jax.nn.relu(jnp.einsum("bshc,bnc->bshn", q, keys)) * (self.dim ** -0.5)
        head_weights = jnp.einsum("bsd,dh->bsh", u.astype(jnp.float32),
                                  self.weights_proj[...].astype(jnp.float32)) * (self.heads ** -0.5)
        index = jnp.einsum("bsh,bshn->bsn", head_weights, scores)
        if n == 0:
            return visible
        index = jnp.where(visible, index, -jnp.inf)
        selected = shard_local(lambda i: top_k_mask(i, min(self.topk, n)), ("act_batch", "act_length"), index)
        return jax.lax.stop_gradient(visible & selected)


def top_k_mask(index: jax.Array, k: int) -> jax.Array:
    """[..., n] scores -> [..., n] bool marking exactly k entries per row: the k largest, and among
    equal scores the lowest indices (jax.lax.top_k's rule; torch.topk breaks ties arbitrarily)."""
    _, chosen = jax.lax.top_k(index, k)
    return jnp.put_along_axis(jnp.zeros(index.shape, bool), chosen, True, axis=-1, inplace=False)
