"""Multi-token prediction: one extra block that, at position i, combines the main model's final streams
with the embedding of token i+1 to predict token i+2 through the shared embedding and head.

Depth k (1-based) consumes the streams of depth k-1 (depth 0 = the main model) and the embedding of
token i+k; its logits at position i are scored against token i+k+1 (see `model.losses`).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from model import params
from model.args import SLIDING, ModelArgs
from model.block import Block
from model.hyper_connections import HyperHead
from model.norms import RMSNorm


class MTPLayer(nnx.Module):
    def __init__(self, args: ModelArgs, rngs: nnx.Rngs):
        d, eps, std, wdt = args.hidden_size, args.rms_norm_eps, args.initializer_range, args.weight_dtype
        self.enorm = RMSNorm(d, "embed", eps)
        self.hnorm = RMSNorm(d, "embed", eps)
        self.e_proj = params.normal(rngs, (d, d), ("embed", "mtp_proj"), std, wdt)
        self.h_proj = params.normal(rngs, (d, d), ("embed", "mtp_proj"), std, wdt)
        self.block = Block(args, (SLIDING, "score"), rngs)
        self.hc_head = HyperHead(args, rngs)
        self.norm = RMSNorm(d, "embed", eps)

    def __call__(
        self,
        streams: jax.Array,
        next_embeds: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        token_ids: jax.Array,
    ):
        """streams [b,s,n,d], next_embeds [b,s,d] (embedding of the token k ahead) ->
        (streams [b,s,n,d] for the next depth, normed hidden [b,s,d] for the head, MoEStats)."""
        dt = streams.dtype
        e = jnp.einsum("bsd,de->bse", self.enorm(next_embeds), self.e_proj[...].astype(dt))
        h = jnp.einsum("bsnd,de->bsne", self.hnorm(streams), self.h_proj[...].astype(dt))
        streams, stats, _ = self.block(h + e[:, :, None, :], positions, segment_ids, token_ids)  # no indexer
        return streams, self.norm(self.hc_head(streams)), stats
