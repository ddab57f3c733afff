"""Greedy decoding for evaluation: the sampler (trainer/sampler.py) at temperature 0, with the weights
bound, in the `generate(prompts) -> ids` form that data/evaluation.py consumes."""

from trainer.sampler import make_sampler


def make_greedy_generate(
    graphdef,
    params,
    routing,
    *,
    max_new_tokens: int,
    batch_rows: int,
    max_prompt_len: int,
    stop_id: int,
    batch_sharding=None,
):
    """-> generate(prompts: list of int32 arrays) -> list of generated id lists (stopping after
    `stop_id`). `batch_rows` rows run at once (a multiple of the batch's shard count).

    On a mesh the program is compiled here, so that a multi-process caller can wait for every process
    to finish compiling before the first collective (trainer.distributed.barrier); every process then
    calls `generate` with the same prompts."""
    sample = make_sampler(
        graphdef,
        max_new_tokens=max_new_tokens,
        batch_rows=batch_rows,
        max_prompt_len=max_prompt_len,
        batch_sharding=batch_sharding,
        compile_with=None if batch_sharding is None else (params, routing),
    )

    def generate(prompts):
        completions = sample(params, routing, prompts, stop_ids=(stop_id,), temperature=0.0)
        return [completion.ids.tolist() for completion in completions]

    return generate
