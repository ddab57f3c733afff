"""Post-training data: JSONL records -> validated records -> token ids with loss masks -> packed,
sharded, checkpointable batches (grain).

Modules, one job each:
- `errors`: the error type that names file and line, and the counter of skipped records.
- `formats`: what a valid SFT / preference / prompt record is, as small dataclasses.
- `jsonl`: file patterns -> records, strict or skipping bad ones.
- `tokenizer`: a `tokenizer.json` behind a narrow interface.
- `chat_template`: conversations -> text pieces that know whether they are training targets.
- `encode`: records -> token ids and loss masks (SFT), or prompt/answer ids (DPO, GRPO).
- `packing`: the over-long policy, the grain packing step that emits the batch fields, and the
  one-pair-per-row layout of DPO batches.
- `shuffle`: seeded per-epoch permutation of in-memory examples (O(1) per element).
- `pipeline`: the grain graph (mixture, shuffle, per-process shard, pack, batch, prefetch), for SFT
  and for preference pairs.
- `rollouts`: rollouts JSONL from any inference engine -> validated groups -> GRPO batches.
- `tasks`: the small checkable tasks of the shipped sample data.
- `evaluation`: exact-match accuracy of a generate function on held-out conversations.

Use from a trainer:

    pipeline = build_sft_pipeline(configs.data.get_config(), process_index=jax.process_index(),
                                  process_count=jax.process_count())
    iterator = iter(pipeline)              # batches of int32[global_batch / processes, seq_len]
    state = iterator.get_state()           # a small JSON-able dict, saved with the train state
    iterator.set_state(state)              # on restore: the same batches follow
    metrics.update(pipeline.stats.as_metrics())   # records read/kept/skipped by reason, length policy
"""
