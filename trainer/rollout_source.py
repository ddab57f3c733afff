"""Batches for GRPO and on-policy distillation: completions of the prompt set, sampled each step from
the current policy (trainer/sampler.py, prefix recomputed per token: correct before fast, for small
models), or for GRPO read from a rollouts JSONL written by any inference engine (data/rollouts.py).

Prompts are taken in a seeded per-epoch order; the saved state is the number of prompts (or rollout
groups) consumed, and each step's sampling key is derived from the run's seed and the step, so a
resumed run samples exactly what the uninterrupted one would have.
"""

import dataclasses

import jax
import numpy as np

from configs.release import ConfigError
from data.encode import encode_prompt, reject
from data.errors import DataError, InvalidRecord, LoadStats
from data.evaluation import completion_text
from data.formats import parse_prompt
from data.jsonl import read_records
from data.rollouts import Rollout, group_advantages, load_rollouts, make_batch
from trainer import rewards
from trainer.sampler import make_sampler
from trainer.step import REPLAY_KEY


def _epoch_order(count: int, seed: int, index: int) -> int:
    """Item `index` of an endless sequence of seeded permutations of range(count)."""
    epoch, offset = divmod(index, count)
    return int(np.random.default_rng((seed, epoch)).permutation(count)[offset])


def _load_prompts(config, encoder, stats, max_prompt_len: int):
    """[(PromptRecord, int32[P])] of every prompt source (weights are not used: sources are concatenated);
    a prompt longer than `max_prompt_len` tokens (seq_len - max_new_tokens) is bad input, named or skipped."""
    prompts = []
    for pattern, _ in config.data.prompt_sources:
        for located in read_records(pattern, parse_prompt, skip_bad=config.data.skip_bad_records, stats=stats):
            try:
                encoded = encode_prompt(located.record, encoder)
                encoder.check_vocab(encoded["prompt"])
                if len(encoded["prompt"]) > max_prompt_len:
                    raise InvalidRecord(
                        "prompt_too_long",
                        f"the prompt has {len(encoded['prompt'])} tokens, more "
                        f"than the {max_prompt_len} that config.data.seq_len={config.data.seq_len} "
                        f"leaves beside max_new_tokens",
                    )
            except InvalidRecord as e:
                reject(located, e, skip_bad=config.data.skip_bad_records, stats=stats)
                continue
            prompts.append((located.record, encoded["prompt"]))
        if not prompts:
            raise DataError(pattern, "no usable prompt", reason="no_examples")
    stats.records_kept += len(prompts)
    return prompts


@dataclasses.dataclass
class _Position:
    consumed: int = 0

    def get_state(self) -> dict:
        return {"consumed": self.consumed}

    def set_state(self, saved: dict) -> None:
        self.consumed = int(saved["consumed"])


class _GroupBatches(_Position):
    """Whole groups of rollouts -> a batch (data/rollouts.make_batch) with group-normalised advantages."""

    def __init__(self, config, settings, encoder, group_size: int, reward_fn):
        super().__init__()
        rows = config.data.global_batch_size
        if rows % group_size:
            raise ConfigError(f"config.data.global_batch_size={rows} is not a multiple of group_size={group_size}")
        self.groups_per_step = rows // group_size
        self.settings, self.encoder, self.group_size, self.reward_fn = settings, encoder, group_size, reward_fn
        self.seq_len, self.seed = config.data.seq_len, config.seed
        self.pad_id = encoder.tokenizer.token_id(encoder.template.pad)
        self.stats = LoadStats()
        self.last = {}

    def _batch(self, groups) -> dict:
        batch = make_batch(groups, seq_len=self.seq_len, pad_id=self.pad_id)
        rewards_, group_ids = batch.pop("rewards"), batch.pop("group_ids")
        lengths = batch["loss_mask"].sum(axis=1)
        self.last = {
            "rollout/reward_mean": float(rewards_.mean()),
            "rollout/reward_max": float(rewards_.max()),
            "rollout/completion_tokens_mean": float(lengths.mean()),
        }
        if self.reward_fn is not None:
            advantages = group_advantages(rewards_, group_ids, self.settings.advantage_eps)
            batch["advantages"] = np.repeat(advantages[:, None], self.seq_len, axis=1)
        return batch

    def metrics(self) -> dict:
        return dict(self.stats.as_metrics(), **self.last)


class SampledSource(_GroupBatches):
    """Each step: batch_size / group_size prompts, `group_size` completions each, sampled with the
    state's weights (GRPO: scored by `reward_fn`; distillation: group_size 1, no reward)."""

    def __init__(self, config, settings, encoder, graphdef, batch_sharding, group_size: int, reward_fn):
        super().__init__(config, settings, encoder, group_size, reward_fn)
        self.prompts = _load_prompts(config, encoder, self.stats, self.seq_len - settings.max_new_tokens)
        self.stop_ids = (encoder.tokenizer.token_id(encoder.template.eos),)
        self.sample = make_sampler(
            graphdef,
            max_new_tokens=settings.max_new_tokens,
            batch_rows=config.data.global_batch_size,
            max_prompt_len=self.seq_len - settings.max_new_tokens,
            batch_sharding=batch_sharding,
        )

    def next(self, state) -> dict:
        chosen = [
            self.prompts[_epoch_order(len(self.prompts), self.seed, self.consumed + i)]
            for i in range(self.groups_per_step)
        ]
        self.consumed += self.groups_per_step
        key = jax.random.fold_in(jax.random.key(self.seed), state.step)
        prompts = [ids for _, ids in chosen for _ in range(self.group_size)]
        completions = self.sample(
            state.params,
            state.routing,
            prompts,
            stop_ids=self.stop_ids,
            key=key,
            temperature=self.settings.temperature,
            top_p=self.settings.top_p,
        )
        groups = []
        for p, (record, ids) in enumerate(chosen):
            members = completions[p * self.group_size : (p + 1) * self.group_size]
            groups.append(
                [
                    Rollout(
                        record=record,
                        prompt_ids=ids,
                        completion_ids=c.ids,
                        sampling_logprobs=c.sampling_logprobs,
                        reward=self._reward(c.ids, record),
                        group=str(p),
                    )
                    for c in members
                ]
            )
        return self._batch(groups)

    def _reward(self, ids, record) -> float:
        return float(self.reward_fn(completion_text(ids, self.encoder), record)) if self.reward_fn else 0.0


class RolloutFileSource(_GroupBatches):
    """GRPO on a rollouts JSONL: batch_size / group_size whole groups per step, in a seeded per-epoch
    order; routed experts are kept for routing replay when `routing_replay` is on."""

    def __init__(self, config, settings, encoder, group_size: int, reward_fn, num_experts: int):
        super().__init__(config, settings, encoder, group_size, reward_fn)
        self.groups = load_rollouts(
            settings.rollouts,
            encoder,
            seq_len=self.seq_len,
            group_size=group_size,
            reward_fn=reward_fn,
            num_experts=num_experts,
            skip_bad=config.data.skip_bad_records,
            stats=self.stats,
        )
        if not self.groups:
            raise DataError(settings.rollouts, "no complete group of rollouts", reason="no_examples")
        if settings.routing_replay and self.groups[0][0].routed_experts is None:
            raise DataError(
                settings.rollouts,
                "config.grpo.routing_replay is on but the rollouts carry no 'routed_experts'",
                reason="bad_routed_experts",
            )

    def next(self, state) -> dict:
        del state
        groups = [
            self.groups[_epoch_order(len(self.groups), self.seed, self.consumed + i)]
            for i in range(self.groups_per_step)
        ]
        self.consumed += self.groups_per_step
        batch = self._batch(groups)
        if not self.settings.routing_replay:
            batch.pop(REPLAY_KEY, None)
        return batch


def build_rollout_source(config, *, process_count: int, graphdef, batch_sharding, encoder):
    """The batch source of `config.objective` "grpo" or "distill"."""
    if process_count > 1:
        raise ConfigError(f"config.objective={config.objective!r} runs on one process; this run has {process_count}")
    if config.objective == "distill":
        return SampledSource(config, config.distill, encoder, graphdef, batch_sharding, group_size=1, reward_fn=None)
    settings = config.grpo
    reward_fn = rewards.get(settings.reward)
    if settings.rollouts:
        return RolloutFileSource(
            config, settings, encoder, settings.group_size, reward_fn, config.model.num_routed_experts
        )
    if settings.routing_replay:
        raise ConfigError(
            "config.grpo.routing_replay needs config.grpo.rollouts: samples of our own model are "
            "routed by the trained model itself"
        )
    return SampledSource(config, settings, encoder, graphdef, batch_sharding, settings.group_size, reward_fn)
