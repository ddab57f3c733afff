"""Where each step's batch comes from, per objective, behind one interface the training loop uses:
`next(state) -> dict of host arrays [B/processes, S, ...]`, `get_state()` / `set_state()` (saved with
the checkpoint, so a resumed run sees the same batches) and `metrics()`.

SFT and DPO read fixed data (grain pipelines); GRPO and distillation sample completions from the
current policy every step (trainer/rollout_source.py).
"""
from data.pipeline import build_preference_pipeline, build_sft_pipeline


class PipelineSource:
    """Batches of a grain pipeline (data/pipeline.py), independent of the train state."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.iterator = iter(pipeline)

    def next(self, state) -> dict:
        del state
        return next(self.iterator)

    def get_state(self):
        return self.iterator.get_state()

    def set_state(self, saved) -> None:
        self.iterator.set_state(saved)

    def metrics(self) -> dict:
        return self.pipeline.stats.as_metrics()


def build_batch_source(config, *, process_index: int, process_count: int, **sampling):
    """The batch source of `config.objective`; `sampling` (graphdef, sharding, ...) is what the
    sampled objectives need (see trainer/rollout_source.build_rollout_source)."""
    if config.objective == "sft":
        return PipelineSource(build_sft_pipeline(config.data, process_index=process_index,
                                                 process_count=process_count))
    if config.objective == "dpo":
        return PipelineSource(build_preference_pipeline(config.data, process_index=process_index,
                                                        process_count=process_count))
    from trainer.rollout_source import build_rollout_source
    return build_rollout_source(config, process_index=process_index, process_count=process_count, **sampling)
