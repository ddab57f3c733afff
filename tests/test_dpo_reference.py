"""DPO with the reference log-probabilities stored with the pairs (`config.dpo.reference="data"`):
dpo_reference.py (score_preferences.py) writes them from the reference model, the preference pipeline batches them,
and they are the reference forward's own numbers, so the loss is the in-step one."""

import itertools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from configs.release import ConfigError
from data.errors import DataError
from data.packing import BATCH_FIELDS
from data.pipeline import build_preference_pipeline
from dpo_reference import check_output, score_pairs
from mesh.sharding import activate
from model.args import from_config
from objectives.dpo import DPO, pair_logprobs
from trainer.sharded_init import build_mesh, init_sharded
from trainer.state import split_variables

PAIRS = 12  # one full batch of 8 and a padded one of 4


def _config(tmp_path, lines):
    config = tiny.get_config()
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(lines))
    config.data.preference_sources = ((str(source), 1.0),)
    return config


def _shipped_pairs(count):
    with open(tiny.get_config().data.preference_sources[0][0]) as f:
        return list(itertools.islice(f, count))


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("scored")
    config = _config(tmp_path, _shipped_pairs(PAIRS))
    output = tmp_path / "scored.jsonl"
    result = score_pairs(config, None, str(output), log=lambda _: None)
    return config, output, result


def test_every_pair_is_written_with_its_reference_logps(scored):
    config, output, result = scored
    assert result == {"scored": PAIRS, "dropped_too_long": 0, "skipped": 0}
    written = [json.loads(line) for line in output.read_text().splitlines()]
    originals = [json.loads(line) for line in _shipped_pairs(PAIRS)]
    assert [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in written] == originals
    assert all(r["ref_chosen_logps"] < 0 and r["ref_rejected_logps"] < 0 for r in written)
    assert not (output.parent / "scored.jsonl.partial").exists()


def test_stored_logps_are_the_reference_forward_and_give_its_loss(scored):
    """The pipeline's reference_logps equal the reference model's summed reply log-probs of the same
    rows (recomputed here on one device), and DPO from them equals DPO with the reference run in the step:
    log 2 when the policy is the reference."""
    config, output, _ = scored
    config.data.preference_sources = ((str(output), 1.0),)
    batch = next(iter(build_preference_pipeline(config.data, with_reference=True)))
    assert batch["reference_logps"].shape == (8, 2) and batch["reference_logps"].dtype == np.float32
    args = from_config(config.model)
    mesh, rules = build_mesh(config.mesh), config.mesh.rules
    with activate(mesh, rules):
        graphdef, state, _ = init_sharded(args, mesh, rules, config.seed)
    params, routing = jax.tree.map(jnp.asarray, jax.device_get(split_variables(state)))
    arrays = {k: jnp.asarray(batch[k]) for k in BATCH_FIELDS}
    forward = jax.jit(lambda p, r, a: nnx.merge(graphdef, p, r)(a["tokens"], a["positions"], a["segment_ids"]))
    output_ = forward(params, routing, arrays)  # one device, no mesh
    sums, valid = pair_logprobs(output_, arrays)
    np.testing.assert_allclose(batch["reference_logps"], sums, rtol=1e-5, atol=1e-4)
    pairs = np.sum(valid)
    in_step, _ = DPO(beta=0.5, bias_update_rate=0.0).loss(output_, arrays, output_, pairs, {})
    stored, metrics = DPO(beta=0.5, bias_update_rate=0.0, reference="data").loss(
        output_, dict(arrays, reference_logps=batch["reference_logps"]), None, pairs, {}
    )
    assert float(in_step) == pytest.approx(math.log(2), abs=1e-6)
    assert float(stored) == pytest.approx(float(in_step), abs=1e-5)
    assert abs(float(metrics["dpo_margin"])) < 1e-4


def test_stored_reference_needs_no_frozen_model_but_the_field():
    stored, in_step = DPO(0.1, 0.0, reference="data"), DPO(0.1, 0.0)
    assert not stored.uses_frozen and stored.batch_keys == BATCH_FIELDS + ("reference_logps",)
    assert in_step.uses_frozen and in_step.batch_keys == BATCH_FIELDS
    with pytest.raises(ValueError, match=r"config.dpo.reference='engine' is not one of \('model', 'data'\)"):
        DPO(0.1, 0.0, reference="engine")


@pytest.mark.parametrize(
    "extra, message",
    [
        ({}, r"pairs.jsonl:2: the pair lacks \['ref_chosen_logps', 'ref_rejected_logps'\].*\[missing_reference\]"),
        ({"ref_chosen_logps": -3.0}, r"pairs.jsonl:2: the pair lacks \['ref_rejected_logps'\]"),
        (
            {"ref_chosen_logps": 0.5, "ref_rejected_logps": -1.0},
            r"pairs.jsonl:2: 'ref_chosen_logps' must be a finite "
            r"log-probability \(<= 0\), got 0.5 \[bad_reference\]",
        ),
        ({"ref_chosen_logps": -1.0, "ref_rejected_logps": "x"}, r"'ref_rejected_logps' must be .*got 'x'"),
    ],
)
def test_pairs_without_valid_reference_logps_are_named(tmp_path, extra, message):
    first, second = (json.loads(line) for line in _shipped_pairs(2))
    good = dict(first, ref_chosen_logps=-2.0, ref_rejected_logps=-3.0)
    config = _config(tmp_path, [json.dumps(good) + "\n", json.dumps(dict(second, **extra)) + "\n"])
    with pytest.raises(DataError, match=message):
        build_preference_pipeline(config.data, with_reference=True)


def test_the_output_is_never_an_input_and_replaced_only_when_asked(tmp_path):
    """score_preferences.py's output check (before any device work): an input file is refused even
    with --overwrite, an existing output without it; a new file, or --overwrite, passes."""
    config = _config(tmp_path, _shipped_pairs(2))
    (source,) = [pattern for pattern, _ in config.data.preference_sources]
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match=r"is one of the input files \(config.data.preference_sources\)"):
            check_output(os.path.join(os.path.dirname(source), ".", os.path.basename(source)), config, overwrite)
    existing = tmp_path / "scored.jsonl"
    existing.write_text("kept\n")
    with pytest.raises(ConfigError, match=r"^--output=\S+scored.jsonl exists: pass --overwrite to replace it$"):
        check_output(str(existing), config, overwrite=False)
    check_output(str(existing), config, overwrite=True)
    check_output(str(tmp_path / "new.jsonl"), config, overwrite=False)
    assert existing.read_text() == "kept\n"
