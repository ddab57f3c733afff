"""Data pipeline config: sources and mixture, tokenizer and template, batch shape, policies.

Defaults point at the shipped sample data and tokenizer (paths absolute, from the repo root), sized
for the tiny model (vocab 512, seq_len 256, batch 8). `get_config(**overrides)` replaces fields.
"""

import os

import ml_collections

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_DIR = os.path.join(REPO_ROOT, "data", "sample")


def sample_path(name: str) -> str:
    return os.path.join(SAMPLE_DIR, name)


def get_config(**overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # (glob pattern, mixture weight) per source; files of one pattern form one source.
    config.sft_sources = ((sample_path("sft_train.jsonl"), 1.0),)
    config.eval_sources = ((sample_path("sft_heldout.jsonl"), 1.0),)
    config.preference_sources = ((sample_path("preference.jsonl"), 1.0),)
    config.prompt_sources = ((sample_path("prompts.jsonl"), 1.0),)

    config.tokenizer_path = sample_path("tokenizer.json")
    config.vocab_size = 512  # the model's embedding rows; larger ids are bad input
    config.template = "deepseek_v4"  # "deepseek_v4" (chat), "deepseek_v4_thinking", or "custom"
    # Used when template == "custom": plain-text role markers around the shipped BOS/EOS/pad.
    config.custom_template = ml_collections.ConfigDict(
        dict(
            bos="<｜begin▁of▁sentence｜>",
            eos="<｜end▁of▁sentence｜>",
            pad="<｜▁pad▁｜>",
            system_prefix="System: ",
            system_suffix="\n",
            user_prefix="User: ",
            user_suffix="\n",
            assistant_prefix="Assistant: ",
            assistant_suffix="<｜end▁of▁sentence｜>",
            special_tokens=("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"),
            thinking_prefix="",
            thinking_suffix="",  # non-empty: a thinking template (see chat_template)
        )
    )
    config.loss_mask = "all_assistant_turns"  # or "last_assistant_turn"

    config.seq_len = 256
    config.global_batch_size = 8  # rows per step over all processes
    # Row blocks of the global batch read as independent streams (trainer/batches.py); 0: one per
    # process. The batches depend on this alone, so fix it to train the same across process counts.
    config.streams = 0
    config.pack = True  # several examples per row (else one per row)
    config.num_packing_bins = 16  # rows filled at once; more -> less padding
    config.overlong = "truncate"  # or "drop"; both are counted
    config.skip_bad_records = False  # True: skip and count by reason; False: raise

    config.shuffle = True
    config.shuffle_seed = 0
    config.num_epochs = ml_collections.config_dict.placeholder(int)  # None: repeat forever
    config.read_threads = 0  # examples are in memory: threads only add GIL contention
    config.read_buffer = 256  # examples read ahead of packing (when read_threads > 0)
    config.prefetch = 2  # batches prepared ahead in a background thread

    config.update(overrides)
    return config
