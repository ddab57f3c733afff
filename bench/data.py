"""Throughput of the data pipeline on this CPU, as one JSON object.

tokens_per_sec counts real (non-padding) tokens delivered in packed batches per second of
iteration; packing_efficiency is their share of all batch cells. Building (read, validate,
tokenise) is timed apart, as it happens once per run. Compare tokens_per_sec with what the training
step consumes (global_batch_size * seq_len * packing_efficiency per step).

    python bench/data.py [--batches 200] [--seq-len 256] [--batch-size 8]
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.data import get_config  # noqa: E402
from data.pipeline import build_sft_pipeline  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=get_config().seq_len)
    parser.add_argument("--batch-size", type=int, default=get_config().global_batch_size)
    args = parser.parse_args(argv)

    config = get_config(seq_len=args.seq_len, global_batch_size=args.batch_size)
    start = time.perf_counter()
    pipeline = build_sft_pipeline(config)
    build_seconds = time.perf_counter() - start

    iterator = iter(pipeline)
    for _ in range(args.warmup):
        next(iterator)
    real = cells = 0
    start = time.perf_counter()
    for _ in range(args.batches):
        batch = next(iterator)
        real += int((batch["segment_ids"] > 0).sum())
        cells += batch["segment_ids"].size
    seconds = time.perf_counter() - start
    iterator.close()

    print(
        json.dumps(
            {
                "tokens_per_sec": round(real / seconds),
                "packing_efficiency": round(real / cells, 4),
                "batches_per_sec": round(args.batches / seconds, 1),
                "build_seconds": round(build_seconds, 3),
                "records": pipeline.stats.records_kept,
                "seq_len": args.seq_len,
                "batch_size": args.batch_size,
            }
        )
    )


if __name__ == "__main__":
    main()
