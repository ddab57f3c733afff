"""Logical layouts of the activations several modules share (names resolved by the mesh rules).

Sequence parallelism: between the tensor-parallel regions every token-wise tensor holds 1/tensor of
each sequence (`act_stream_length`), so the tensor ranks split the residual streams, mHC, norms and
the replicated narrow projections instead of each computing all of them. The narrow per-token
projections (attention's q_latent and kv, the compressors' kv and gate) are computed on those shards
and gathered whole once, for the parts that need every position (head-parallel attention, pooling).
"""

STREAMS = ("act_batch", "act_stream_length", "act_hc", "act_embed")  # [b, s, n, d]
TOKENS = ("act_batch", "act_stream_length", "act_embed")  # [b, s, d]
NARROW_SHARDED = ("act_batch", "act_stream_length", None)  # [b, s, c], c << d
NARROW_WHOLE = ("act_batch", "act_length", None)  # the same, gathered
