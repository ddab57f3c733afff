"""One transformer block: mHC around attention, then mHC around the MoE."""

import jax
from flax import nnx

from model.args import ModelArgs
from model.attention import Attention
from model.hyper_connections import HyperConnection
from model.moe import MoE
from model.norms import RMSNorm


class Block(nnx.Module):
    def __init__(self, args: ModelArgs, kind: tuple, rngs: nnx.Rngs):
        """kind = (attention kind, "hash" | "score"), see `args.layer_kind`."""
        attention_kind, routing = kind
        d, eps = args.hidden_size, args.rms_norm_eps
        self.attn_hc = HyperConnection(args, rngs)
        self.attn_norm = RMSNorm(d, "embed", eps)
        self.attn = Attention(args, attention_kind, rngs)
        self.ffn_hc = HyperConnection(args, rngs)
        self.ffn_norm = RMSNorm(d, "embed", eps)
        self.moe = MoE(args, routing == "hash", rngs)

    def __call__(
        self,
        streams: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        token_ids: jax.Array,
        replay=None,
        indexer_loss: bool = False,
    ):
        """streams [b,s,n,d]; positions, segment_ids, token_ids [b,s]; replay [b,s,k] int32 or None (experts
        to use instead of the router's choice) -> (streams, MoEStats, the indexer's summed KL: a float32
        scalar, 0 unless `indexer_loss` in a CSA layer; see model.attention)."""
        u, post, comb = self.attn_hc(streams)
        attention, indexer_kl = self.attn(self.attn_norm(u), positions, segment_ids, indexer_loss)
        streams = HyperConnection.merge(streams, attention, post, comb)
        u, post, comb = self.ffn_hc(streams)
        out, stats = self.moe(self.ffn_norm(u), token_ids, segment_ids > 0, replay)
        return HyperConnection.merge(streams, out, post, comb), stats, indexer_kl
