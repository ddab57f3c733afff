"""Every shipped config is a complete run config, each number read by several entry points lives in
one field, and the scaled twins keep the structure of the full-size configs they stand for. No
compiles: configs, abstract shapes and source text only."""

import os
import re

import ml_collections
import pytest

from configs import checkpoint, tiny, v4_flash, v4_pro
from configs.release import ConfigError, resolve_tokenizer
from data.errors import DataError
from data.pipeline import build_encoder
from configs.v4_model import compress_ratios
from model.args import from_config, layer_groups

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHIPPED = {
    "tiny": tiny.get_config,
    **{f"v4_pro:{layout}": (lambda layout=layout: v4_pro.get_config(layout)) for layout in v4_pro.LAYOUTS},
    **{f"v4_flash:{variant}": (lambda variant=variant: v4_flash.get_config(variant)) for variant in v4_flash.VARIANTS},
}
SECTIONS = ("model", "mesh", "data", "checkpoint", "eval", "optimizer", "train", "dpo", "grpo", "distill")
TWINS = {"v4_pro": (v4_pro.get_config, "cm384", "scaled"), "v4_flash": (v4_flash.get_config, "full", "scaled")}


def _leaf_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    paths = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        paths += _leaf_paths(value, path + ".") if isinstance(value, ml_collections.ConfigDict) else [path]
    return paths


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_config_is_a_complete_run_config(name):
    config = SHIPPED[name]()
    assert [section for section in SECTIONS if section not in config] == []
    assert config.objective == "sft"
    checkpoint.validate(config.checkpoint)
    assert config.eval.batch_rows % config.data.global_batch_size == 0 or config.data.global_batch_size < 32


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_the_batch_shape_and_vocabulary_live_in_one_field(name):
    """Batch shape: config.data alone. Vocabulary and schedule length: one value behind two names, so
    overriding either name (as a command line does) moves both."""
    config = SHIPPED[name]()
    shape_fields = [
        p for p in _leaf_paths(config) if p.rsplit(".", 1)[-1] in ("batch_size", "global_batch_size", "seq_len")
    ]
    assert shape_fields == ["data.global_batch_size", "data.seq_len"]
    for first, second in (("model.vocab_size", "data.vocab_size"), ("train.steps", "optimizer.total_steps")):
        for written, read in ((first, second), (second, first)):
            section, field = written.split(".")
            config[section][field] = config[section][field] + 7
            assert config[read.split(".")[0]][read.split(".")[1]] == config[section][field], (written, read)


def test_no_entry_point_reads_a_batch_shape_field_of_its_own():
    """The grep-able proof, beside the field list above: no Python file outside tests reads a run
    config's batch_size (the removed duplicate of data.global_batch_size; the data modules read their
    section's global_batch_size and seq_len) or sets a data.vocab_size of its own (it refers to
    model.vocab_size)."""
    pattern = re.compile(r"config\.batch_size\b|data\.vocab_size\s*=[^=]")
    found = []
    for directory, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "tests"]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                for number, line in enumerate(open(path, encoding="utf-8"), 1):
                    if pattern.search(line) and not path.endswith(os.path.join("configs", "v4_model.py")):
                        found.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}")
    assert found == []


def _structure(config) -> dict:
    """What a scaled twin must share with its full-size config."""
    args = from_config(config.model)
    model = config.model
    return {
        "layer groups": [pattern for pattern, _, _ in layer_groups(args)],
        "opening": model.compress_ratios[:2],
        "alternation": model.compress_ratios[2:4],
        "mtp layers": model.compress_ratios[-1:],
        "hash layers": model.num_hash_layers,
        "mtp": model.num_mtp_layers,
        "experts per token": model.num_experts_per_tok,
        "shared experts": model.num_shared_experts,
        "heads per output group": model.num_heads // model.o_groups,
        "routed scale": model.routed_scaling_factor,
        "yarn": model.rope_scaling.to_dict(),
        "rope thetas": (model.rope_theta, model.compress_rope_theta),
        "mhc": (model.hc_mult, model.hc_sinkhorn_iters),
        "dispatch": (model.moe_dispatch, model.capacity_factor),
        "remat": model.remat_policy,
        "dtypes": (model.dtype, model.param_dtype),
        "optimizer": config.optimizer.name,
        "mesh axes used": sorted(axis for axis, size in config.mesh.axes.items() if size > 1),
        "rules": config.mesh.rules,
        "objective": config.objective,
        "tokenizer named by": "release_dir" if config.data.tokenizer_path is None else "data.tokenizer_path",
    }


@pytest.mark.parametrize("name", sorted(TWINS))
def test_scaled_twins_keep_the_full_size_structure(name):
    get, full_name, scaled_name = TWINS[name]
    full, scaled = _structure(get(full_name)), _structure(get(scaled_name))
    differing = {key: (full[key], scaled[key]) for key in full if full[key] != scaled[key]}
    assert differing == {"tokenizer named by": ("release_dir", "data.tokenizer_path")}
    twin = get(scaled_name)
    assert twin.model.index_topk < twin.data.seq_len // 4  # the CSA selection is a real choice
    assert twin.model.compress_ratios == compress_ratios(twin.model.num_layers, first=twin.model.compress_ratios[0])


def test_the_release_directory_supplies_the_tokenizer(tmp_path):
    config = v4_flash.get_config()
    with pytest.raises(ConfigError, match=r"config.data.tokenizer_path is unset: pass --config.release_dir="):
        resolve_tokenizer(config)
    config.release_dir = str(tmp_path / "absent")
    with pytest.raises(ConfigError, match=r"^--config.release_dir=\S+absent: no such directory$"):
        resolve_tokenizer(config)
    config.release_dir = str(tmp_path)
    with pytest.raises(ConfigError, match=r"the release has no tokenizer.json"):
        resolve_tokenizer(config)
    (tmp_path / "tokenizer.json").write_text("{}")
    assert resolve_tokenizer(config) == str(tmp_path / "tokenizer.json") == config.data.tokenizer_path
    with pytest.raises(
        DataError,
        match=rf"^{tmp_path}/tokenizer.json: cannot load the tokenizer named by "
        r"config.data.tokenizer_path \(or config.release_dir\): ",
    ):
        build_encoder(config.data)  # unreadable
    config = tiny.get_config()
    config.data.tokenizer_path = str(tmp_path / "none.json")
    with pytest.raises(ConfigError, match=r"^--config.data.tokenizer_path=\S+none.json: no such file$"):
        resolve_tokenizer(config)
