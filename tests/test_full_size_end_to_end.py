"""The scaled twins of the full-size configs (configs/v4_pro.py:scaled, configs/v4_flash.py:scaled)
through the whole user chain, each step a real command-line run as a user types it:

release FP8/FP4 checkpoint + tokenizer.json -> convert.py import -> train.py SFT (2 steps, then
resumed to 3), reading the release's tokenizer -> score_preferences.py -> train.py DPO on the stored
reference log-probs -> convert.py export to FP8/FP4 -> `transformers` loads the export and gives the
logits of our model restored from it (re-imported in float32), to 2e-4 of the largest logit.

The commands share JAX's persistent compilation cache: the resumed SFT run loads the first run's
compiled step, and the later runs its initialisation.
"""

import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from configs import v4_flash, v4_pro
from hf_io.fixtures import write_release_checkpoint
from hf_io.release_format import FP8_RELEASE
from model.args import from_config
from tests.test_convert import _logits, _relative_error, _restored_model
from tests.test_train_main import ROOT, _finish, _records, _spawn

TWINS = {"v4_pro": (v4_pro, "configs/v4_pro.py:scaled"), "v4_flash": (v4_flash, "configs/v4_flash.py:scaled")}
LOGITS_RTOL = 2e-4
NO_EVAL = "--config.eval.num_examples=0"


class Chain:
    """One twin's chain: where each step wrote (under `root`) and what each command printed, by name."""

    def __init__(self, twin: str, root: Path, compilation_cache: Path):
        self.twin, self.root, self.compilation_cache, self.stdout = twin, root, compilation_cache, {}
        self.release, self.imported, self.sft, self.dpo, self.exported, self.reimported = (
            root / name for name in ("release", "imported", "sft", "dpo", "exported", "reimported")
        )
        self.scored = root / "scored.jsonl"


def _twin_config(twin: str):
    module, _ = TWINS[twin]
    return module.get_config("scaled")


def _write_release(directory: Path, config):
    """A release-format checkpoint (FP8 tiles, MXFP4 routed experts) with the sample tokenizer beside it."""
    write_release_checkpoint(str(directory), from_config(config.model), FP8_RELEASE, seed=3)
    shutil.copy(ROOT / "data/sample/tokenizer.json", directory / "tokenizer.json")


def _command(chain: Chain, name: str, script: str, *flags) -> str:
    """`python <script> <flags>` run to completion from the repo root -> its stdout (logs next to it)."""
    env = {"JAX_COMPILATION_CACHE_DIR": str(chain.compilation_cache)}
    stdout, _ = _finish(_spawn([script, *flags], chain.root, name, env), chain.root, name)
    chain.stdout[name] = stdout
    return stdout


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory) -> Path:
    """JAX_COMPILATION_CACHE_DIR of every command in this module."""
    return tmp_path_factory.mktemp("compilation_cache")


@pytest.fixture(scope="module", params=sorted(TWINS))
def chain(request, tmp_path_factory, compilation_cache) -> Chain:
    """The whole chain for one twin, every command's stdout kept by name."""
    twin = request.param
    config_flag = f"--config={TWINS[twin][1]}"
    chain = Chain(twin, tmp_path_factory.mktemp(twin), compilation_cache)
    release = f"--config.release_dir={chain.release}"
    _write_release(chain.release, _twin_config(twin))
    _command(
        chain,
        "import",
        "convert.py",
        "--direction=import",
        config_flag,
        f"--input={chain.release}",
        f"--output={chain.imported}",
    )
    sft = ["train.py", config_flag, f"--workdir={chain.sft}", f"--init_checkpoint={chain.imported}", release, NO_EVAL]
    _command(chain, "sft", *sft, "--steps=2")
    _command(chain, "sft_resumed", *sft, "--steps=3")
    _command(
        chain,
        "score",
        "score_preferences.py",
        config_flag,
        f"--init_checkpoint={chain.sft}",
        release,
        f"--output={chain.scored}",
    )
    _command(
        chain,
        "dpo",
        "train.py",
        config_flag,
        "--config.objective=dpo",
        "--config.dpo.reference=data",
        f"--config.data.preference_sources=(('{chain.scored}', 1.0),)",
        f"--init_checkpoint={chain.sft}",
        f"--workdir={chain.dpo}",
        release,
        "--steps=1",
        NO_EVAL,
    )
    _command(
        chain,
        "export",
        "convert.py",
        "--direction=export",
        config_flag,
        f"--input={chain.dpo}",
        f"--output={chain.exported}",
        "--format=fp8",
    )
    _command(
        chain,
        "reimport",
        "convert.py",
        "--direction=import",
        config_flag,
        f"--input={chain.exported}",
        f"--output={chain.reimported}",
        "--dtype=float32",
    )
    return chain


def _logged_steps(stdout: str) -> list[int]:
    return [int(step) for step in re.findall(r"^step (\d+): loss [0-9.]+", stdout, re.MULTILINE)]


def test_release_imports_and_sft_resumes(chain):
    """SFT starts from the imported release; the second run resumes at step 2 and runs step 3."""
    assert f"from {chain.release} into {chain.imported}" in chain.stdout["import"]
    first, resumed = chain.stdout["sft"], chain.stdout["sft_resumed"]
    assert f"initial weights from {chain.imported}\n" in first
    assert _logged_steps(first) == [1, 2]
    assert f"resumed from step 2 in {chain.sft}\n" in resumed
    assert "initial weights from" not in resumed, "a resumed run ignores --init_checkpoint"
    assert _logged_steps(resumed) == [3]


def test_dpo_trains_on_the_scored_pairs(chain):
    """The pairs were scored with the SFT weights DPO starts from, so its first loss is log 2."""
    assert f"reference weights from {chain.sft}\n" in chain.stdout["score"]
    assert re.search(
        rf"^wrote {re.escape(str(chain.scored))}: {{'scored': [1-9]\d*, ", chain.stdout["score"], re.MULTILINE
    )
    assert f"initial weights from {chain.sft}\n" in chain.stdout["dpo"]
    (record,) = _records(chain.dpo)
    assert record["step"] == 1 and record["pairs"] > 0
    assert abs(record["main_loss"] - math.log(2.0)) < 1e-4, record


def test_export_loads_in_transformers_with_our_logits(chain):
    """transformers dequantises the FP8/MXFP4 export itself; ours run the same weights (the export
    re-imported) in float32 on the twin's 8-device mesh, over the training length (every attention
    kind has compressed entries). Both attend to every CSA entry (top-k = the sequence length): with
    random weights and the twin's 4 indexer heads, entries whose heads all clip to 0 tie at the k-th
    index score, which ours breaks to the lowest index and torch.topk arbitrarily (test_model_parity
    compares the selection, with 32 indexer heads)."""
    assert f"from {chain.dpo} into {chain.exported}" in chain.stdout["export"]
    config = _twin_config(chain.twin)
    config.model.update(
        dtype="float32", index_topk=config.data.seq_len, capacity_factor=0.0
    )  # dropless, as transformers computes every choice
    args = from_config(config.model)
    tokens = np.random.default_rng(0).integers(0, args.vocab_size, (8, config.data.seq_len)).astype(np.int32)
    graphdef, weights, missing, mesh, rules = _restored_model(str(chain.reimported), config)
    assert missing == []
    ours = _logits(graphdef, weights, mesh, rules, tokens)

    from transformers import DeepseekV4ForCausalLM

    loaded = DeepseekV4ForCausalLM.from_pretrained(
        chain.exported, dtype=torch.float32, index_topk=args.index_topk
    ).eval()
    with torch.no_grad():
        theirs = loaded(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    assert _relative_error(ours, theirs) < LOGITS_RTOL
