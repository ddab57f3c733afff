"""Analytic FLOPs of the model, the yardstick for XLA's counted FLOPs and for MFU.

Counts what the architecture needs, not what an implementation computes: matmuls of the parameters
a token activates (k of E routed experts, the head, MTP), attention over the keys a query really uses
(its window, the visible compressed entries or the top-k of them) and the indexer's scores. A
training step is forward + backward = 3x forward.
"""

import numpy as np

from model.args import CSA, HCA, ModelArgs
from model.summary import count_parameters


def matmul_params_per_token(args: ModelArgs) -> float:
    """Parameters each token multiplies: DeepSeek's activated count plus the MTP module's."""
    counts = count_parameters(args)
    mtp_routed = args.num_mtp_layers * args.num_routed_experts * 3 * args.hidden_size * args.moe_intermediate_size
    mtp_active = counts["mtp_params"] - mtp_routed * (1 - args.num_experts_per_tok / args.num_routed_experts)
    return counts["active_params"] + mtp_active


def attention_flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Mean over positions 0..seq_len-1 of one document: score and value FLOPs of every layer."""
    t = np.arange(seq_len)
    window = np.minimum(t + 1, args.sliding_window)
    per_key = 4 * args.num_heads * args.head_dim  # q.k and p.v
    total = 0.0
    for layer in list(range(args.num_layers)) + list(args.mtp_layer_ids):
        kind, ratio = args.attention_kind(layer), args.compress_ratio(layer)
        keys = window.astype(np.float64)
        if kind == HCA:
            keys = keys + (t + 1) // ratio
        elif kind == CSA:
            visible = (t + 1) // ratio
            keys = keys + np.minimum(visible, args.index_topk)
            total += np.mean(visible) * 2 * args.index_n_heads * args.index_head_dim  # indexer scores
        total += np.mean(keys) * per_key
    return total


def train_flops_per_token(args: ModelArgs, seq_len: int) -> float:
    return 3 * (2 * matmul_params_per_token(args) + attention_flops_per_token(args, seq_len))


def train_flops_per_step(args: ModelArgs, batch_size: int, seq_len: int) -> float:
    return train_flops_per_token(args, seq_len) * batch_size * seq_len
