"""Config validation and the split of the layer schedule into scan groups."""

import random
import re

import pytest

from configs import tiny, v4_flash, v4_pro
from model.args import from_config, layer_groups

KIND_BY_RATIO = {0: "sliding", 4: "csa", 128: "hca"}
TINY_KINDS = ("sliding", "sliding", "csa", "hca", "csa", "hca", "sliding")  # the tiny schedule, MTP last


def tiny_fields(**overrides) -> dict:
    fields = dict(tiny.get_config().model)
    fields.update(overrides)
    return fields


def _without(field: str) -> dict:
    fields = tiny_fields()
    del fields[field]
    return fields


@pytest.mark.parametrize(
    "fields, field, detail",
    [
        (tiny_fields(compress_ratios=(0, 0, 4, 128, 4, 128)), "compress_ratios", "has 6 entries"),
        (tiny_fields(compress_ratios=(0, 0, 8, 128, 4, 128, 0)), "compress_ratios", "values [8] need"),
        (tiny_fields(compress_ratios=(0, 0, 4, 128, 4, 128, 4)), "compress_ratios", "MTP"),
        (
            tiny_fields(compress_ratios=(0, 0, 1, 16, 1, 16, 0), attention_kinds=TINY_KINDS),
            "compress_ratios",
            "csa layers have ratios [1]; each must be > 1",
        ),
        (
            tiny_fields(compress_ratios=(0, 0, 8, 0, 8, 0, 0), attention_kinds=TINY_KINDS),
            "compress_ratios",
            "hca layers have ratios [0]; each must be > 1",
        ),
        (
            tiny_fields(compress_ratios=(0, 0, 8, 16, 4, 16, 0), attention_kinds=TINY_KINDS),
            "compress_ratios",
            "csa layers have ratios [4, 8]; all layers of a kind share one ratio",
        ),
        (
            tiny_fields(compress_ratios=(0, 8, 8, 16, 8, 16, 0), attention_kinds=TINY_KINDS),
            "compress_ratios",
            "sliding-window layers have ratios [0, 8]",
        ),
        (tiny_fields(attention_kinds=TINY_KINDS[:-1]), "attention_kinds", "has 6 entries"),
        (tiny_fields(attention_kinds=("dense",) + TINY_KINDS[1:]), "attention_kinds", "values ['dense']"),
        (
            tiny_fields(compress_ratios=(0, 0, 4, 128, 4, 128, 4), attention_kinds=TINY_KINDS[:-1] + ("csa",)),
            "attention_kinds",
            "MTP",
        ),
        (tiny_fields(dtype="float64"), "dtype", "'float64'"),
        (tiny_fields(hidden_dim=64), "hidden_dim", "unknown field"),
        (_without("num_heads"), "num_heads", "missing"),
        (tiny_fields(o_groups=3), "o_groups", "does not divide num_heads=4"),
    ],
    ids=[
        "ratios_length",
        "ratio_value",
        "mtp_ratio",
        "ratio_one",
        "ratio_zero",
        "two_csa_ratios",
        "sliding_ratio",
        "kinds_length",
        "kind_value",
        "mtp_kind",
        "dtype",
        "unknown",
        "missing",
        "o_groups",
    ],
)
def test_errors_name_the_field(fields, field, detail):
    """A user editing a config must be told, in one line, which field is wrong and why."""
    with pytest.raises(ValueError, match=re.escape(f"config.model.{field}:")) as error:
        from_config(fields)
    assert detail in str(error.value)
    assert "\n" not in str(error.value)


def test_kinds_come_from_attention_kinds():
    """With `attention_kinds`, any ratio above 1 serves CSA or HCA; one ratio per compressed kind."""
    args = from_config(tiny_fields(compress_ratios=(0, 0, 8, 32, 8, 32, 0), attention_kinds=TINY_KINDS))
    assert [args.attention_kind(layer) for layer in range(7)] == list(TINY_KINDS)
    assert args.kind_ratios() == {"sliding": 0, "csa": 8, "hca": 32}
    swapped = from_config(tiny_fields(attention_kinds=("sliding", "sliding", "hca", "csa", "hca", "csa", "sliding")))
    assert swapped.kind_ratios() == {"sliding": 0, "hca": 4, "csa": 128}


def test_tiny_config_is_valid():
    """The base of the error cases above is itself accepted, so each error comes from its one edit."""
    assert from_config(tiny_fields()).num_layers == 6


def _expand(groups) -> list:
    kinds = []
    for pattern, repeats, first in groups:
        assert first == len(kinds), "groups must be contiguous and in layer order"
        kinds += list(pattern) * repeats
    return kinds


@pytest.mark.parametrize(
    "config_module, expected",
    [
        (
            v4_pro,
            (((("hca", "hash"),), 2, 0), ((("csa", "hash"),), 1, 2), ((("hca", "score"), ("csa", "score")), 29, 3)),
        ),
        (
            v4_flash,
            (((("sliding", "hash"),), 2, 0), ((("csa", "hash"),), 1, 2), ((("hca", "score"), ("csa", "score")), 20, 3)),
        ),
    ],
    ids=["v4_pro", "v4_flash"],
)
def test_released_layer_groups(config_module, expected):
    """The released schedules compile as three layer bodies: two hash-routed runs and one HCA/CSA scan."""
    args = from_config(config_module.get_config().model)
    groups = layer_groups(args)
    assert groups == expected
    assert len(_expand(groups)) == args.num_layers


def _random_ratios(rng: random.Random, num_layers: int) -> list:
    """Runs of one kind and of alternating pairs, so both pattern periods and their boundaries occur."""
    ratios = []
    while len(ratios) < num_layers:
        a, b = rng.choice(list(KIND_BY_RATIO)), rng.choice(list(KIND_BY_RATIO))
        ratios += [a, b] * rng.randint(1, 4) if rng.random() < 0.5 else [a] * rng.randint(1, 5)
    return ratios[:num_layers]


@pytest.mark.parametrize("seed", range(20))
def test_layer_groups_reproduce_any_schedule(seed):
    """Scanning the groups must run exactly the per-layer kinds, in order, with no mergeable neighbours."""
    rng = random.Random(seed)
    num_layers = rng.randint(1, 40)
    ratios = _random_ratios(rng, num_layers)
    num_hash_layers = rng.randint(0, num_layers)
    args = from_config(
        tiny_fields(num_layers=num_layers, compress_ratios=tuple(ratios) + (0,), num_hash_layers=num_hash_layers)
    )
    groups = layer_groups(args)
    expected = [(KIND_BY_RATIO[r], "hash" if layer < num_hash_layers else "score") for layer, r in enumerate(ratios)]
    assert _expand(groups) == expected
    assert all(len(pattern) in (1, 2) and repeats >= 1 for pattern, repeats, _ in groups)
    assert all(a[0] != b[0] for a, b in zip(groups, groups[1:])), "adjacent groups with one pattern compile twice"
