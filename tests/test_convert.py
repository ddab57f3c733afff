"""convert.py's library (hf_io): Hugging Face checkpoints <-> Orbax, both ways, on tiny models.

- Round trips: release bf16 -> Orbax -> bf16 and release FP8/FP4 -> Orbax -> FP8/FP4 give back every
  tensor byte for byte (names, dtypes, codes, scales).
- Dequantisation equals a decoder written here from the spec's bit layouts, not from hf_io.
- End to end: a `transformers` model saved with `save_pretrained`, imported and restored on the
  8-device mesh gives the `transformers` logits; its export (from an OCDBT training-style checkpoint
  holding optimizer state too) loads in `transformers` and gives ours. Tolerance: 2e-5 of the largest
  logit, as in test_model_parity (float32 weights that are exact in bf16, so the export loses nothing).
- Bad input fails before writing, naming the file or tensor; a full disk mid-write leaves nothing.
- Several processes: convert.py run as 2 processes writes what one process writes, byte for byte.
"""

import errno
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx

from configs import tiny
from hf_io import orbax_writer, quant, safetensors_writer
from hf_io.atomic import INCOMPLETE_MARK
from hf_io.exporter import export_checkpoint
from hf_io.fixtures import write_release_checkpoint
from hf_io.importer import import_checkpoint
from hf_io.team import Team
from hf_io.orbax_reader import WeightsReader
from hf_io.progress import Progress
from hf_io.safetensors_reader import INDEX_FILE, CheckpointError, SafetensorsCheckpoint
from hf_io.safetensors_writer import PlannedTensor, write_shards
from hf_io.validation import ConfigMismatch, ConversionError
from hf_io.weights_layout import model_leaves
from mesh.sharding import activate, param_shardings
from model.args import from_config
from model.transformer import DeepSeekV4
from tests.hf_reference import random_reference
from trainer.checkpointing import Checkpointer, check_missing
from trainer.sharded_init import build_mesh
from trainer.state import split_variables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGITS_RTOL = 2e-5
PARITY_MODEL = dict(sliding_window=16, index_topk=8, index_n_heads=32)  # tests.model_configs.parity_args


def _config(**model_overrides):
    config = tiny.get_config()
    config.model.update(model_overrides)
    return config


def _same_files(first: str, second: str):
    """Both checkpoints hold the same tensor names, dtypes and bytes."""
    a, b = SafetensorsCheckpoint(first), SafetensorsCheckpoint(second)
    assert sorted(a.tensors) == sorted(b.tensors)
    for name, info in a.tensors.items():
        assert (info.dtype, info.shape) == (b.tensors[name].dtype, b.tensors[name].shape), name
        assert a.read(name).tobytes() == b.read(name).tobytes(), name


# ---------------------------------------------------------------- decoders written from the spec


def spec_e4m3(byte):
    """e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; exponent 0 is subnormal; S.1111.111 is
    NaN; no infinities."""
    byte = np.asarray(byte, np.int64)
    sign = np.where(byte >> 7, -1.0, 1.0)
    exponent, mantissa = (byte >> 3) & 0xF, byte & 0x7
    value = np.where(exponent == 0, mantissa / 8 * 2.0**-6, (1 + mantissa / 8) * 2.0 ** (exponent - 7))
    return np.where((exponent == 15) & (mantissa == 7), np.nan, sign * value)


def spec_e2m1(nibble):
    """e2m1: 1 sign, 2 exponent (bias 1), 1 mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and negatives."""
    nibble = np.asarray(nibble, np.int64)
    sign = np.where(nibble >> 3, -1.0, 1.0)
    exponent, mantissa = (nibble >> 1) & 0x3, nibble & 0x1
    return sign * np.where(exponent == 0, mantissa * 0.5, (1 + mantissa / 2) * 2.0 ** (exponent - 1))


def spec_ue8m0(byte):
    return 2.0 ** (np.asarray(byte, np.int64) - 127)


def spec_decode_fp8(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """W[o, i] = e4m3(q[o, i]) * scale[o // 128, i // 128] (ue8m0 bytes, or float32 in Base checkpoints)."""
    rows, cols = np.arange(codes.shape[0]) // 128, np.arange(codes.shape[1]) // 128
    factors = scales.astype(np.float64) if scales.dtype == np.float32 else spec_ue8m0(scales.view(np.uint8))
    return spec_e4m3(codes.view(np.uint8)) * factors[np.ix_(rows, cols)]


def spec_decode_fp4(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Byte k of a row holds input 2k in its low nibble and 2k+1 in its high nibble;
    W[o, i] = e2m1(code) * 2^(s[o, i // 32] - 127)."""
    packed = packed.view(np.uint8)
    codes = np.empty((packed.shape[0], 2 * packed.shape[1]), np.int64)
    codes[:, 0::2], codes[:, 1::2] = packed & 0xF, packed >> 4
    return spec_e2m1(codes) * np.repeat(spec_ue8m0(scales.view(np.uint8)), 32, axis=1)


def test_decoders_match_the_spec_bit_for_bit():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (200, 300), dtype=np.uint8)  # partial tiles at both edges
    codes[(codes & 0x7F) == 0x7F] = 0
    tile_scales = rng.integers(100, 150, quant.tile_grid(codes.shape), dtype=np.uint8)
    expected = spec_decode_fp8(codes, tile_scales)
    assert np.array_equal(quant.decode_fp8(codes.view(quant.E4M3), tile_scales), expected)
    float_scales = rng.uniform(1e-4, 1e-2, tile_scales.shape).astype(np.float32)
    assert np.array_equal(
        quant.decode_fp8(codes.view(quant.E4M3), float_scales), spec_decode_fp8(codes, float_scales).astype(np.float32)
    )
    packed = rng.integers(0, 256, (40, 48), dtype=np.uint8).view(np.int8)
    block_scales = rng.integers(100, 150, (40, 3), dtype=np.uint8)
    expected = spec_decode_fp4(packed, block_scales)
    assert np.array_equal(quant.decode_fp4(packed, block_scales), expected)
    # bfloat16 decoding is exact too (the spec's claim): same values as float32.
    assert np.array_equal(quant.decode_fp4(packed, block_scales, dtype=ml_dtypes.bfloat16).astype(np.float64), expected)


def test_encoders_round_trip_their_own_codes():
    rng = np.random.default_rng(1)
    weights = 0.02 * rng.standard_normal((130, 256)).astype(np.float32)
    codes, exponents = quant.encode_fp8(weights)
    assert np.abs(quant.decode_fp8(codes, exponents) - weights).max() <= np.abs(weights).max() / 16
    again = quant.encode_fp8(quant.decode_fp8(codes, exponents))
    assert again[0].tobytes() == codes.tobytes() and again[1].tobytes() == exponents.tobytes()
    packed, exponents = quant.encode_fp4(weights)
    again = quant.encode_fp4(quant.decode_fp4(packed, exponents))
    assert again[0].tobytes() == packed.tobytes() and again[1].tobytes() == exponents.tobytes()


# ---------------------------------------------------------------- release-layout round trips


@pytest.fixture(scope="module")
def config():
    return _config()


@pytest.fixture(scope="module")
def release(tmp_path_factory, config):
    """{format: (release checkpoint dir, imported workdir)} for the tiny config."""
    root = tmp_path_factory.mktemp("release")
    out = {}
    for fmt in ("fp8", "bf16", "fp8_base"):
        source, imported = str(root / fmt), str(root / f"{fmt}-orbax")
        write_release_checkpoint(source, from_config(config.model), fmt, seed=3)
        import_checkpoint(source, imported, config)
        out[fmt] = source, imported
    return out


def test_fixture_has_release_layout(release):
    source, _ = release["fp8"]
    checkpoint = SafetensorsCheckpoint(source)
    assert len(checkpoint.files) > 2
    dtypes = {name: info.dtype for name, info in checkpoint.tensors.items()}
    assert dtypes["layers.3.ffn.experts.5.w1.weight"] == "I8"
    assert dtypes["layers.3.ffn.experts.5.w1.scale"] == "F8_E8M0"
    assert dtypes["layers.2.attn.wq_a.weight"] == "F8_E4M3" and dtypes["mtp.0.e_proj.scale"] == "F8_E8M0"
    assert dtypes["embed.weight"] == "BF16" and dtypes["hc_head_fn"] == "F32"
    assert dtypes["layers.0.ffn.gate.tid2eid"] == "I64" and "layers.0.ffn.gate.bias" not in dtypes


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_round_trip_reproduces_every_byte(release, config, tmp_path, fmt):
    source, imported = release[fmt]
    export_checkpoint(imported, str(tmp_path / "hf"), config, fmt=fmt, max_shard_bytes=200_000)
    _same_files(source, str(tmp_path / "hf"))
    assert len(SafetensorsCheckpoint(str(tmp_path / "hf")).files) > 1


@pytest.mark.parametrize("fmt", ["fp8", "fp8_base"])
def test_imported_values_are_the_spec_dequantisation(release, config, fmt):
    """Imported weights equal the spec decoder applied to the files, after our layout change."""
    source, imported = release[fmt]
    checkpoint, reader = SafetensorsCheckpoint(source), WeightsReader(imported)
    leaves = model_leaves(from_config(config.model), config.mesh)
    cases = [
        ("layers.3.ffn.experts.5.w1", "groups.2.blocks.0.moe.experts.w1", (0, 5)),
        ("layers.4.ffn.shared_experts.w2", "groups.3.blocks.0.moe.shared.w2", (0,)),
        ("mtp.0.h_proj", "mtp.0.h_proj", ()),
    ]
    for release_name, leaf, index in cases:
        codes, scales = checkpoint.read(release_name + ".weight"), checkpoint.read(release_name + ".scale")
        decode = spec_decode_fp4 if codes.dtype == np.int8 else spec_decode_fp8
        stored = reader.read(leaves[leaf].name, index)
        assert stored.dtype == ml_dtypes.bfloat16
        expected = decode(codes, scales).T.astype(np.float32).astype(ml_dtypes.bfloat16)
        assert np.array_equal(stored, expected), release_name


def test_chunks_follow_the_target_mesh(release, config):
    """Each zarr chunk is one layer's (and one expert's) slice of one device's shard."""
    _, imported = release["fp8"]
    state = os.path.join(orbax_writer.step_directory(imported, 0), "state")
    with open(os.path.join(state, "params.groups.2.blocks.0.moe.experts.w1.value", ".zarray")) as f:
        zarray = json.load(f)
    assert zarray["shape"] == [1, 8, 64, 64] and zarray["chunks"] == [1, 1, 16, 64]  # fsdp 4 x expert 2
    with open(os.path.join(state, "params.embed.value", ".zarray")) as f:
        assert json.load(f)["chunks"] == [512, 8]  # embed over (fsdp, expert) = 8


def test_dry_run_writes_nothing(release, config, tmp_path):
    source, imported = release["fp8"]
    summary = import_checkpoint(source, str(tmp_path / "a"), config, dry_run=True)
    assert summary.tensors > 300 and not summary.without_mtp
    export_checkpoint(imported, str(tmp_path / "b"), config, fmt="fp8", dry_run=True)
    assert os.listdir(tmp_path) == []


def test_progress_line_reports_bytes_rate_and_eta():
    now = [0.0]
    progress = Progress("import x", 4 << 30, clock=lambda: now[0])
    now[0] = 2.0
    progress.advance(1 << 30)
    assert progress.line() == "import x: 1.00/4.00 GiB (25%), 537 MB/s, ETA 6 s"


# ---------------------------------------------------------------- end to end with transformers


def _bf16_exact_reference(args):
    """A random `transformers` model whose float32 weights are exact in bf16 (so a bf16 export is lossless)."""
    reference = random_reference(args, seed=0)
    with torch.no_grad():
        for tensor in reference.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(torch.bfloat16).to(tensor.dtype))
    return reference


def _restored_model(workdir, config):
    """Our model on the config's 8-device mesh with the weights of `workdir` (MTP zero when absent)."""
    args = from_config(config.model)
    mesh, rules = build_mesh(config.mesh), config.mesh.rules
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: DeepSeekV4(args, nnx.Rngs(0))))
    with activate(mesh, rules):
        specs = param_shardings(abstract, mesh, rules)
    targets = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, specs)
    params, routing = split_variables(targets)
    abstract_weights = {"params": params, "routing": routing}
    fallback = jax.tree.map(lambda a: jax.device_put(jnp.zeros(a.shape, a.dtype), a.sharding), abstract_weights)
    weights, missing = Checkpointer(workdir, config, keep=1, save_every=1).restore_weights(
        None, abstract_weights, fallback
    )
    return graphdef, weights, missing, mesh, rules


def _logits(graphdef, weights, mesh, rules, tokens):
    with activate(mesh, rules):
        return np.asarray(
            jax.jit(lambda p, r, t: nnx.merge(graphdef, p, r)(t).logits)(weights["params"], weights["routing"], tokens)
        )


def _relative_error(ours, reference):
    return np.abs(ours - reference).max() / np.abs(reference).max()


def test_transformers_checkpoint_to_our_mesh_and_back(tmp_path):
    config = _config(**PARITY_MODEL)
    args = from_config(config.model)
    reference = _bf16_exact_reference(args)
    reference.save_pretrained(tmp_path / "hf")
    tokens = np.random.default_rng(1).integers(0, args.vocab_size, (8, 48)).astype(np.int32)  # batch over 8 devices
    with torch.no_grad():
        expected = reference(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()

    summary = import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "orbax"), config, dtype="float32")
    assert summary.without_mtp
    graphdef, weights, missing, mesh, rules = _restored_model(str(tmp_path / "orbax"), config)
    assert missing and all("/mtp/" in path for path in missing)
    check_missing(str(tmp_path / "orbax"), missing)  # what train.py --init_checkpoint accepts without asking
    experts = weights["params"]["groups"][0]["blocks"][0]["moe"]["experts"]["w1"][...]
    assert len(experts.sharding.device_set) == 8
    ours = _logits(graphdef, weights, mesh, rules, tokens)
    print(f"imported: relative logits error {_relative_error(ours, expected):.1e}")
    assert _relative_error(ours, expected) < LOGITS_RTOL

    # Export from a training-style checkpoint: OCDBT, with optimizer state beside the weights.
    trained = Checkpointer(tmp_path / "run", config, keep=1, save_every=1, async_save=False)
    params = nnx.filter_state(weights["params"], lambda path, _: path[0] != "mtp")
    routing = nnx.filter_state(weights["routing"], lambda path, _: path[0] != "mtp")
    trained.save(7, {"params": params, "routing": routing, "opt_state": {"mu": jnp.ones(3)}}, {}, force=True)
    trained.close()
    export_checkpoint(str(tmp_path / "run"), str(tmp_path / "exported"), config, fmt="bf16")
    from transformers import DeepseekV4ForCausalLM

    loaded = DeepseekV4ForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = loaded(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    print(f"exported: relative logits error {_relative_error(theirs, ours):.1e}")
    assert _relative_error(theirs, ours) < LOGITS_RTOL


# ---------------------------------------------------------------- bad input and failed writes


def _rewrite(source: str, target: str, edits: dict, config_edits: dict | None = None):
    """A copy of checkpoint `source` in one shard with `edits` applied: name -> (dtype, array) to
    replace or add, or None to drop."""
    checkpoint = SafetensorsCheckpoint(source)
    tensors = {name: (info.dtype, checkpoint.read(name)) for name, info in checkpoint.tensors.items()}
    for name, edit in edits.items():
        if edit is None:
            del tensors[name]
        else:
            tensors[name] = edit
    os.makedirs(target)
    plan = [PlannedTensor(name, dtype, tuple(array.shape)) for name, (dtype, array) in tensors.items()]
    write_shards(target, plan, (array for _, array in tensors.values()), max_shard_bytes=1 << 40)
    with open(os.path.join(source, "config.json")) as f:
        hf_config = json.load(f)
    hf_config.update(config_edits or {})
    with open(os.path.join(target, "config.json"), "w") as f:
        json.dump(hf_config, f)


def _fails_cleanly(source, output, config, match):
    with pytest.raises((ConversionError, CheckpointError), match=match):
        import_checkpoint(source, output, config)
    parent = os.path.dirname(output)
    assert not os.path.exists(output)
    assert not [name for name in os.listdir(parent) if INCOMPLETE_MARK in name]


def test_truncated_shard_is_named(release, config, tmp_path):
    source = str(tmp_path / "hf")
    shutil.copytree(release["fp8"][0], source)
    shard = SafetensorsCheckpoint(source).files[-1]
    os.truncate(shard, os.path.getsize(shard) - 1000)
    _fails_cleanly(source, str(tmp_path / "out"), config, f"{shard}: truncated.*tensors cut off")


def test_a_scale_that_decodes_to_nan_is_named(release, config, tmp_path):
    """A ue8m0 scale byte of 255 is NaN: the import names the tensor instead of storing NaN weights."""
    name = "layers.1.attn.wkv.scale"
    checkpoint = SafetensorsCheckpoint(release["fp8"][0])
    scale = checkpoint.read(name).copy()
    scale.view(np.uint8).flat[0] = 255
    source = str(tmp_path / "hf")
    _rewrite(release["fp8"][0], source, {name: (checkpoint.tensors[name].dtype, scale)})
    _fails_cleanly(
        source,
        str(tmp_path / "out"),
        config,
        r"layers\.1\.attn\.wkv\.weight: \d+ values decode to "
        r"NaN/Inf, the first at \[0, 0\]",
    )


def test_missing_index_entry_is_named(release, config, tmp_path):
    source = str(tmp_path / "hf")
    shutil.copytree(release["fp8"][0], source)
    with open(os.path.join(source, INDEX_FILE)) as f:
        index = json.load(f)
    del index["weight_map"]["layers.4.attn.wkv.scale"]
    with open(os.path.join(source, INDEX_FILE), "w") as f:
        json.dump(index, f)
    _fails_cleanly(
        source,
        str(tmp_path / "out"),
        config,
        r"'layers\.4\.attn\.wkv\.scale' in model-\d+-of-\d+"
        r"\.safetensors has no index entry",
    )


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            {"layers.2.attn.wq_b.weight": ("BF16", np.zeros((128, 16), ml_dtypes.bfloat16))},
            r"mis-shaped layers\.2\.attn\.wq_b\.weight: \[128, 16\], expected \[128, 32\]",
        ),
        ({"norm.weight": ("I32", np.zeros(64, np.int32))}, r"mis-typed norm\.weight: I32"),
        (
            {"layers.1.attn.wkv.scale": ("BF16", np.zeros((1, 1), ml_dtypes.bfloat16))},
            r"mis-typed layers\.1\.attn\.wkv\.scale: BF16",
        ),
        (
            {"layers.0.attn.wq_c.weight": ("BF16", np.zeros((4, 4), ml_dtypes.bfloat16))},
            r"unexpected tensors \(1\):\n  layers\.0\.attn\.wq_c\.weight",
        ),
        (
            {"layers.5.ffn.experts.7.w2.weight": None},
            r"missing tensors \(1\):\n  layers\.5\.ffn\.experts\.7\.w2\.weight",
        ),
    ],
    ids=["wrong-shape", "wrong-dtype", "wrong-scale-dtype", "unknown-key", "missing-tensor"],
)
def test_bad_tensor_is_named(release, config, tmp_path, edit, match):
    source = str(tmp_path / "hf")
    _rewrite(release["fp8"][0], source, edit)
    _fails_cleanly(source, str(tmp_path / "out"), config, match)


def test_other_model_config_is_named_as_such(release, config, tmp_path):
    source = str(tmp_path / "hf")
    _rewrite(release["fp8"][0], source, {}, config_edits={"hidden_size": 128, "n_routed_experts": 16})
    with pytest.raises(ConfigMismatch, match="config mismatch.*\n  hidden_size: checkpoint has 128, the config has 64"):
        import_checkpoint(source, str(tmp_path / "out"), config)
    wider = _config(hidden_size=128)  # no config.json to compare: the shapes say it
    os.remove(os.path.join(source, "config.json"))
    with pytest.raises(ConversionError, match="does not match the config: .* tensors missing or wrong"):
        import_checkpoint(source, str(tmp_path / "out"), wider)


def test_full_disk_during_import_leaves_nothing(release, config, tmp_path, monkeypatch):
    calls = []

    def full_disk(array, index, value):
        calls.append(index)
        if len(calls) == 40:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return array[index].write(value)

    monkeypatch.setattr(orbax_writer, "write_slice", full_disk)
    _fails_cleanly(release["fp8"][0], str(tmp_path / "out"), config, r"converting \S+ into \S+.*No space left")


def test_full_disk_during_export_leaves_nothing(release, config, tmp_path, monkeypatch):
    calls = []

    def full_disk(f, data):
        calls.append(len(data))
        if len(calls) == 100:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        f.write(data)

    monkeypatch.setattr(safetensors_writer, "write_bytes", full_disk)
    output = str(tmp_path / "out")
    with pytest.raises(ConversionError, match=r"exporting layers\.\S+ failed.*No space left"):
        export_checkpoint(release["fp8"][1], output, config, fmt="fp8", max_shard_bytes=100_000)
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_train_starts_from_an_imported_checkpoint(release, tmp_path):
    """`train.py --init_checkpoint` restores a converted release checkpoint (MTP included) and trains."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config=configs/tiny.py",
            f"--workdir={tmp_path}",
            "--steps=1",
            f"--init_checkpoint={release['fp8'][1]}",
            "--config.eval.num_examples=8",
            "--config.eval.batch_rows=8",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"initial weights from {release['fp8'][1]}\n" in result.stdout
    assert re.search(r"step 1: loss [0-9.]+", result.stdout)


# ---------------------------------------------------------------- several processes


def test_team_shares_are_disjoint_balanced_and_agreed():
    sizes = [70, 10, 10, 40, 30, 30, 5, 5]
    shares = [Team(p, 3).share(sizes) for p in range(3)]
    assert sorted(i for share in shares for i in share) == list(range(len(sizes)))
    loads = [sum(sizes[i] for i in share) for share in shares]
    assert max(loads) - min(loads) <= max(sizes[i] for i in range(len(sizes)) if sizes[i] < 70)
    assert all(share == sorted(share) for share in shares)
    assert Team().share(sizes) == list(range(len(sizes)))


def _files_under(root: str) -> dict:
    """Relative path -> bytes of every file, but the step metadata (it holds the write time)."""
    out = {}
    for directory, _, names in os.walk(root):
        for name in names:
            if name != orbax_writer.ORBAX_STEP_METADATA:
                path = os.path.join(directory, name)
                out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


def test_two_processes_import_what_one_does(release, tmp_path):
    """convert.py as 2 processes on loopback: each converts its share into one output, process 0
    publishes it; the files equal the one-process import's, byte for byte."""
    from tests.test_multihost import _free_port, _process_flags
    from tests.test_train_main import _finish, _spawn

    source, imported = release["fp8"]
    output = tmp_path / "out"
    port = _free_port()
    processes = [
        _spawn(
            [
                "convert.py",
                "--direction=import",
                "--config=configs/tiny.py",
                f"--input={source}",
                f"--output={output}",
                *_process_flags(i, port),
            ],
            tmp_path,
            f"convert{i}",
        )
        for i in range(2)
    ]
    outputs = [_finish(process, tmp_path, f"convert{i}", timeout=600) for i, process in enumerate(processes)]
    assert f"into {output}" in outputs[0][0] and "imported" not in outputs[1][0]  # gloo prints its own lines
    assert "(process 0 of 2)" in outputs[0][1] and "(process 1 of 2)" not in outputs[1][1]  # progress: process 0
    ours, theirs = _files_under(str(output)), _files_under(imported)
    assert sorted(ours) == sorted(theirs)
    assert [name for name in ours if ours[name] != theirs[name]] == []
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["out", *(f"convert{i}.{s}" for i in range(2) for s in ("stdout", "stderr"))]
    )
