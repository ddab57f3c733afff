"""Manifold-constrained hyper-connections (mHC): the residual is `hc_mult` streams, not one vector.

At each site (before attention, before the MoE) a small function of all streams decides how to
collapse them into the sub-layer input (`pre`), how to spread the output back (`post`), and how to mix
the streams themselves (`comb`, projected towards a doubly-stochastic matrix by Sinkhorn iterations so
the residual path cannot amplify). All of it in float32.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from mesh.sharding import constrain
from model import params
from model.args import ModelArgs
from model.layouts import STREAMS
from model.norms import rms_normalize


def sinkhorn(logits: jax.Array, iters: int, eps: float) -> jax.Array:
    """[..., n, n] logits -> near doubly-stochastic; the row softmax is the first row normalisation."""
    comb = jax.nn.softmax(logits, axis=-1) + eps
    comb = comb / (jnp.sum(comb, axis=-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (jnp.sum(comb, axis=-1, keepdims=True) + eps)
        comb = comb / (jnp.sum(comb, axis=-2, keepdims=True) + eps)
    return comb


def _mix_inputs(streams: jax.Array, fn: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over all streams jointly, then the mixing projection: [b,s,n,d] -> [b,s,m]."""
    b, s, n, d = streams.shape
    flat = rms_normalize(streams.reshape(b, s, n * d), eps).reshape(b, s, n, d)
    return jnp.einsum("bsnd,ndm->bsm", flat, fn.astype(jnp.float32))


def collapse(streams: jax.Array, weights: jax.Array) -> jax.Array:
    """sum_j weights_j * X_j, in float32, returned in the streams' dtype: [b,s,n,d],[b,s,n] -> [b,s,d]."""
    return jnp.einsum("bsn,bsnd->bsd", weights, streams.astype(jnp.float32)).astype(streams.dtype)


class HyperConnection(nnx.Module):
    """One mHC site. fn: [n, d, (2+n)*n] mapping vec(X) to (pre | post | comb) logits."""

    def __init__(self, args: ModelArgs, rngs: nnx.Rngs):
        n, d = args.hc_mult, args.hidden_size
        self.n, self.iters, self.hc_eps, self.norm_eps = n, args.hc_sinkhorn_iters, args.hc_eps, args.rms_norm_eps
        self.fn = params.normal(
            rngs, (n, d, (2 + n) * n), ("hc", "embed", "hc_mix"), args.initializer_range, jnp.float32
        )
        self.base = params.constant(((2 + n) * n,), ("hc_mix",), 0.0, jnp.float32)
        self.scale = params.constant((3,), ("hc_gate",), 1.0, jnp.float32)

    def __call__(self, streams: jax.Array):
        """streams [b,s,n,d] -> (sub-layer input [b,s,d], post [b,s,n], comb [b,s,n,n] indexed [j,k])."""
        n = self.n
        mixes = _mix_inputs(streams, self.fn[...], self.norm_eps)
        base, scale = self.base[...], self.scale[...]
        pre = jax.nn.sigmoid(mixes[..., :n] * scale[0] + base[:n]) + self.hc_eps
        post = 2.0 * jax.nn.sigmoid(mixes[..., n : 2 * n] * scale[1] + base[n : 2 * n])
        comb_logits = mixes[..., 2 * n :] * scale[2] + base[2 * n :]
        comb = sinkhorn(comb_logits.reshape(*comb_logits.shape[:-1], n, n), self.iters, self.hc_eps)
        return collapse(streams, pre), post, comb

    @staticmethod
    def merge(streams: jax.Array, output: jax.Array, post: jax.Array, comb: jax.Array) -> jax.Array:
        """X'_k = post_k * F(u) + sum_j comb[j, k] * X_j (comb acts transposed), in the streams' dtype."""
        dtype = streams.dtype
        spread = post.astype(dtype)[..., None] * output.astype(dtype)[..., None, :]
        mixed = jnp.einsum("bsjk,bsjd->bskd", comb.astype(dtype), streams)
        return constrain(spread + mixed, STREAMS)


class HyperHead(nnx.Module):
    """Final collapse of the streams into one vector (sigmoid weights, no Sinkhorn, no post/comb)."""

    def __init__(self, args: ModelArgs, rngs: nnx.Rngs):
        n, d = args.hc_mult, args.hidden_size
        self.hc_eps, self.norm_eps = args.hc_eps, args.rms_norm_eps
        self.fn = params.normal(rngs, (n, d, n), ("hc", "embed", "hc_mix"), args.initializer_range, jnp.float32)
        self.base = params.constant((n,), ("hc_mix",), 0.0, jnp.float32)
        self.scale = params.constant((1,), ("hc_gate",), 1.0, jnp.float32)

    def __call__(self, streams: jax.Array) -> jax.Array:
        mixes = _mix_inputs(streams, self.fn[...], self.norm_eps)
        pre = jax.nn.sigmoid(mixes * self.scale[...][0] + self.base[...]) + self.hc_eps
        return collapse(streams, pre)
