"""Import throughput and memory of convert.py on a generated release-layout checkpoint of >= 1 GiB.

    python bench/convert.py [--layers=6 --experts=256 --hidden=512 --inter=1024 --shard_mib=512]

Writes an FP8/FP4 checkpoint (random code and scale bytes, the release's formats and names) into a
temporary directory, reads its shards once plainly (large sequential reads), then imports it in a
child process (bf16 output) and reports one JSON object:
- throughput_mb_s: input bytes / seconds of the import itself (the child's interpreter start and
  imports are excluded);
- plain_read_mb_s: the same files read plainly, same page-cache state;
- write_bound_mb_s: input bytes / seconds to write as many bytes as the import wrote into one plain
  file beside it and sync it once (as the import syncs once before publishing): the throughput of
  an import whose reading, decoding and re-layout cost nothing. Dequantising to bf16 writes ~3x the
  input (an FP4 byte holds two values of two bytes each), so this bounds throughput_mb_s;
- peak_rss_over_largest_shard: the child's peak resident set (getrusage of the child, which includes
  the Python/JAX baseline) over the largest shard's size.
Targets (issue 7): peak RSS under 3x the largest shard; throughput at least half the plain read.
The second needs the host to write bf16 output ~1.9x faster than it reads the input from page cache
(3.7 output bytes per input byte here); throughput_over_write_bound says how near the import is
to the host's own write speed.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READ_CHUNK = 16 << 20


def bench_config(layers: int, experts: int, hidden: int, inter: int):
    """The tiny config's structure with many, wider experts: the routed experts dominate the bytes,
    as in the release (97-98% of the weights)."""
    from configs import tiny
    from configs.v4_model import compress_ratios

    config = tiny.get_config()
    config.model.update(
        num_layers=layers,
        compress_ratios=compress_ratios(layers, first=0),
        num_routed_experts=experts,
        hidden_size=hidden,
        moe_intermediate_size=inter,
    )
    return config


def plain_read_seconds(files: list) -> float:
    buffer = bytearray(READ_CHUNK)
    started = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    return time.perf_counter() - started


def plain_write_seconds(path: str, nbytes: int) -> float:
    buffer = os.urandom(READ_CHUNK)
    started = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for offset in range(0, nbytes, READ_CHUNK):
            f.write(memoryview(buffer)[: min(READ_CHUNK, nbytes - offset)])
        os.fsync(f.fileno())
    seconds = time.perf_counter() - started
    os.remove(path)
    return seconds


def child_import(flags):
    """Runs in the child: one import, timed; prints {"seconds": ...}."""
    from hf_io.importer import import_checkpoint

    config = bench_config(flags.layers, flags.experts, flags.hidden, flags.inter)
    started = time.perf_counter()
    import_checkpoint(flags.source, flags.output, config)
    print(json.dumps({"seconds": time.perf_counter() - started}))


def main(flags):
    from hf_io.fixtures import write_release_checkpoint
    from hf_io.safetensors_reader import SafetensorsCheckpoint
    from model.args import from_config

    config = bench_config(flags.layers, flags.experts, flags.hidden, flags.inter)
    with tempfile.TemporaryDirectory(dir=flags.tmp) as root:
        source, output = os.path.join(root, "hf"), os.path.join(root, "orbax")
        started = time.perf_counter()
        write_release_checkpoint(
            source, from_config(config.model), "fp8", quantise=False, max_shard_bytes=flags.shard_mib << 20
        )
        generate_s = time.perf_counter() - started
        files = SafetensorsCheckpoint(source).files
        sizes = [os.path.getsize(path) for path in files]
        if sum(sizes) < 1 << 30:
            raise SystemExit(f"generated only {sum(sizes) / 2**30:.2f} GiB; raise --layers or --experts")
        read_s = plain_read_seconds(files)
        child = subprocess.run(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--child",
                f"--source={source}",
                f"--output={output}",
                f"--layers={flags.layers}",
                f"--experts={flags.experts}",
                f"--hidden={flags.hidden}",
                f"--inter={flags.inter}",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONPATH=ROOT),
        )
        if child.returncode:
            raise SystemExit(child.stderr[-3000:])
        convert_s = json.loads(child.stdout.strip().splitlines()[-1])["seconds"]
        peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
        output_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(output) for f in names)
        write_s = plain_write_seconds(os.path.join(root, "plain_write"), output_bytes)
    input_bytes, largest = sum(sizes), max(sizes)
    result = {
        "throughput_mb_s": round(input_bytes / convert_s / 1e6, 1),
        "plain_read_mb_s": round(input_bytes / read_s / 1e6, 1),
        "write_bound_mb_s": round(input_bytes / write_s / 1e6, 1),
        "throughput_over_write_bound": round(write_s / convert_s, 3),
        "peak_rss_over_largest_shard": round(peak_rss / largest, 3),
        "input_bytes": input_bytes,
        "shards": len(sizes),
        "largest_shard_bytes": largest,
        "peak_rss_bytes": peak_rss,
        "output_bytes": output_bytes,
        "convert_s": round(convert_s, 2),
        "generate_s": round(generate_s, 2),
        "throughput_target_met": input_bytes / convert_s >= 0.5 * input_bytes / read_s,
        "rss_target_met": peak_rss < 3 * largest,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--inter", type=int, default=1024)
    parser.add_argument("--shard_mib", type=int, default=512)
    parser.add_argument("--tmp", default=None, help="Where the temporary checkpoints go (default: $TMPDIR).")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    sys.path.insert(0, ROOT)
    child_import(parsed) if parsed.child else main(parsed)
