"""Parameter counts of the released configs, checked three ways: against the integers the summary
reports today, against the section-4 formulas of ../shared/design/deepseek_v4_architecture.md
evaluated here independently, and against the published headline figures."""

import json
import pathlib
import subprocess
import sys

import pytest

from configs import v4_flash, v4_pro
from model import summary
from model.args import from_config

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TOTAL_KEYS = ("total_params", "total_params_without_mtp", "mtp_params", "active_params")

# name: (config module, exact counts today, (sliding, CSA, HCA) layers per spec 1.3,
#        headline figures in billions to the spec table's rounding: (value, decimals))
RELEASED = {
    "v4_flash": (
        v4_flash,
        dict(
            total_params=290942289362,
            total_params_without_mtp=284332240471,
            mtp_params=6610048891,
            active_params=13270101591,
        ),
        (2, 21, 20),
        dict(
            total_params=(290.94, 2),
            total_params_without_mtp=(284.33, 2),
            mtp_params=(6.61, 2),
            active_params=(13.27, 2),
        ),
    ),
    "v4_pro": (
        v4_pro,
        dict(
            total_params=1598837347742,
            total_params_without_mtp=1572997201763,
            mtp_params=25840145979,
            active_params=48852402019,
        ),
        (0, 30, 31),
        dict(
            total_params=(1598.8, 1),
            total_params_without_mtp=(1573.0, 1),
            mtp_params=(25.84, 2),
            active_params=(48.85, 2),
        ),
    ),
}


def spec_counts(args) -> dict:
    """Section 4 of the spec, term by term, per component name of `model.summary`."""
    V, d, H, c = args.vocab_size, args.hidden_size, args.num_heads, args.head_dim
    d_c, g, d_g = args.q_lora_rank, args.o_groups, args.o_lora_rank
    E, I = args.num_routed_experts, args.moe_intermediate_size
    n_I, c_I, n = args.index_n_heads, args.index_head_dim, args.hc_mult
    m, m_hca = 4, 128
    attention_core = d * d_c + d_c + d_c * H * c + d * c + c + H * c * d_g + g * d_g * d + H
    compressor = {"sliding": 0, "csa": 4 * d * c + 2 * m * c + c, "hca": 2 * d * c + m_hca * c + c}
    indexer = d_c * n_I * c_I + d * n_I + 4 * d * c_I + 2 * m * c_I + c_I
    expert = 3 * d * I
    mix = (2 + n) * n  # 24 for 4 streams
    mhc = 2 * (mix * n * d + mix + 3)
    hc_head = n * n * d + n + 1  # 16d + 5

    counts = dict.fromkeys(summary.COMPONENTS, 0)
    counts["embedding"] = counts["head"] = V * d
    counts["final_head"] = d + hc_head
    kinds = {0: "sliding", 4: "csa", 128: "hca"}
    for layer in range(args.num_layers):
        kind = kinds[args.compress_ratios[layer]]
        counts["attention"] += attention_core
        counts["compressor"] += compressor[kind]
        counts["indexer"] += indexer if kind == "csa" else 0
        counts["routed_experts"] += E * expert
        counts["shared_expert"] += expert
        counts["router"] += E * d + (E if layer >= args.num_hash_layers else 0)
        counts["hyper_connections"] += mhc
        counts["norms"] += 2 * d
    counts["mtp"] = 2 * d * d + 5 * d + hc_head + attention_core + E * expert + expert + E * d + E + mhc
    return counts


@pytest.fixture(scope="module", params=sorted(RELEASED))
def released(request):
    config_module, exact, schedule, headline = RELEASED[request.param]
    args = from_config(config_module.get_config().model)
    return args, summary.count_parameters(args), exact, schedule, headline


def test_counts_are_the_known_integers(released):
    """Pins today's counts so any change to the parameter tree of a released size is noticed."""
    _, counts, exact, _, _ = released
    assert {key: counts[key] for key in TOTAL_KEYS} == exact


def test_schedule_matches_spec(released):
    """The independent count sums over the config's schedule, so the schedule itself must be the spec's."""
    args, _, _, schedule, _ = released
    ratios = args.compress_ratios[: args.num_layers]
    assert (ratios.count(0), ratios.count(4), ratios.count(128)) == schedule
    assert args.compress_ratios[args.num_layers :] == (0,)
    assert args.num_hash_layers == 3


def test_counts_follow_spec_formulas(released):
    """Every component, and the totals derived from them, equals the spec's closed-form count."""
    args, counts, _, _, _ = released
    expected = spec_counts(args)
    assert counts["components"] == expected
    without_mtp = sum(expected.values()) - expected["mtp"]
    inactive_experts = (
        (args.num_routed_experts - args.num_experts_per_tok)
        * args.num_layers
        * 3
        * args.hidden_size
        * args.moe_intermediate_size
    )
    assert counts["total_params"] == sum(expected.values())
    assert counts["total_params_without_mtp"] == without_mtp
    assert counts["mtp_params"] == expected["mtp"]
    assert counts["active_params"] == without_mtp - expected["embedding"] - inactive_experts


def test_components_sum_to_total(released):
    """The table's rows must partition the model: nothing counted twice or left out."""
    _, counts, _, _, _ = released
    assert sum(counts["components"].values()) == counts["total_params"]
    assert counts["total_params"] - counts["mtp_params"] == counts["total_params_without_mtp"]


def test_headline_figures(released):
    """Matches the spec's rounded totals (official: Flash 284B / 13B activated, Pro 1.6T / 49B)."""
    _, counts, _, _, headline = released
    assert {key: round(counts[key] / 1e9, decimals) for key, (_, decimals) in headline.items()} == {
        key: value for key, (value, _) in headline.items()
    }


def _run_cli(*flags) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "model.summary", "--config=configs/v4_flash.py", *flags],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_cli_json():
    """`--json` output is one machine-readable object carrying the four totals."""
    printed = json.loads(_run_cli("--json"))
    assert {key: printed[key] for key in TOTAL_KEYS} == RELEASED["v4_flash"][1]


def test_cli_table():
    """The default output is a table with a row for every component and every total."""
    rows = {line.split()[0] for line in _run_cli().splitlines() if line.strip()}
    assert set(summary.COMPONENTS) | set(TOTAL_KEYS) <= rows
