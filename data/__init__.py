"""Post-training data: JSONL records -> validated records -> token ids with loss masks -> packed,
sharded, checkpointable batches (grain).

One job per module: `formats` (valid records), `jsonl` (files -> records), `tokenizer`, `chat_template`
(conversations -> tagged pieces), `encode` (ids and loss masks), `packing`, `shuffle`, `pipeline` (the
grain graph), `rollouts` (GRPO batches from an inference engine), `tasks` (sample data), `evaluation`.
Start at `pipeline.build_sft_pipeline`: its iterator's `get_state()` / `set_state()` restore the exact
position, so a resumed run sees the batches it would have seen. Module map and usage: docs/data.md.
"""
