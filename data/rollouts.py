"""Rollouts written by any inference engine -> validated groups of completions -> fixed-shape GRPO
batches, with each completion's reward normalised within its group (`group_advantages`).

A record is one JSON object per line: prompt, completion (ids preferred, or text), the sampling
policy's log-probs, optional reward, group and routed experts (docs/data.md lists the fields).
Invariants: all groups have one size G; a completion the end-of-reply token ended carries it with its
log-prob; routed experts are on every record or none. Bad input is a `DataError` naming file and line,
or with `skip_bad` a count under a reason code, and a skipped record takes its whole group with it.
Reason codes and the rules for each field: docs/data.md.
"""

import collections
import dataclasses
import math
from typing import Callable, Optional, Sequence

import numpy as np

from data.encode import Encoder, encode_prompt, reject
from data.errors import DataError, InvalidRecord, LoadStats
from data.evaluation import completion_text
from data.formats import PromptRecord, parse_prompt
from data.jsonl import Located, read_records

ROLLOUT_FIELDS = ("completion", "completion_ids", "logprobs", "reward", "group", "routed_experts")

# reward_fn(completion text, prompt record) -> reward, as trainer/rewards.py registers them
RewardFn = Callable[[str, PromptRecord], float]


@dataclasses.dataclass(frozen=True)
class Rollout:
    """One completion of a prompt. Also built directly from the project's sampler (ids and sampling
    log-probs of a trainer.sampler.Completion) so both sources share `make_batch`."""

    record: PromptRecord  # the prompt, its answer and other fields, for reward functions
    prompt_ids: np.ndarray  # int32[P], rendered with the chat template, ends with the reply cue
    completion_ids: np.ndarray  # int32[C]
    sampling_logprobs: np.ndarray  # float32[C], log-prob of each completion id when it was sampled
    reward: float
    group: str  # the group's name: its "group" value, or its prompt's last message
    routed_experts: Optional[np.ndarray] = None  # int32[P + C, layers, k]
    where: str = ""  # "path:line" it came from, for messages


def _number_list(record: dict, field: str, reason: str) -> list:
    if field not in record:
        raise InvalidRecord(reason, f"missing field {field!r}")
    value = record[field]
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise InvalidRecord("wrong_type", f"field {field!r} must be a list of numbers")
    return value


def _group_key(prompt: PromptRecord, fields: dict) -> tuple[tuple, str]:
    """(key, name) of a record's group: its "group" value, or else its prompt."""
    if "group" not in fields:
        return ("prompt", prompt.prompt), prompt.prompt[-1].content
    group = fields["group"]
    if not isinstance(group, (str, int)) or isinstance(group, bool):
        raise InvalidRecord("wrong_type", f"field 'group' must be a string or an integer, got {type(group).__name__}")
    return ("group", group), str(group)


def _completion_ids(fields: dict, encoder: Encoder) -> np.ndarray:
    if ("completion" in fields) == ("completion_ids" in fields):
        raise InvalidRecord("missing_field", "a rollout needs exactly one of 'completion' and 'completion_ids'")
    if "completion_ids" in fields:
        ids = fields["completion_ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise InvalidRecord("wrong_type", "field 'completion_ids' must be a non-empty list of integers")
        ids = np.asarray(ids, np.int64)
        encoder.check_vocab(ids)
        return ids.astype(np.int32)
    text = fields["completion"]
    if not isinstance(text, str) or not text:
        raise InvalidRecord("wrong_type", "field 'completion' must be a non-empty string")
    eos = encoder.template.eos
    body, ended = (text[: -len(eos)], True) if text.endswith(eos) else (text, False)
    encoder.reply_message(body, ended=ended)  # refuses stray markers, and a thinking reply without `</think>`
    (ids,) = encoder.ids([body])
    return np.concatenate([ids, [encoder.tokenizer.token_id(eos)] if ended else []]).astype(np.int32)


def _logprobs(fields: dict, count: int, given_as_text: bool, eos: str) -> np.ndarray:
    values = np.asarray(_number_list(fields, "logprobs", "missing_logprobs"), np.float32)
    if len(values) != count:
        hint = (
            f" (a completion the end-of-reply token ended must end with {eos!r} or be given as ids)"
            if given_as_text and len(values) == count + 1
            else ""
        )
        raise InvalidRecord("logprob_count", f"{len(values)} log-probs for {count} completion tokens{hint}")
    if not np.isfinite(values).all():
        raise InvalidRecord("nonfinite_logprob", f"log-prob {int(np.argmin(np.isfinite(values)))} is not finite")
    return values


def _reward(fields: dict, text: str, prompt: PromptRecord, reward_fn: Optional[RewardFn]) -> float:
    if "reward" in fields:
        reward = fields["reward"]
        if not isinstance(reward, (int, float)) or isinstance(reward, bool):
            raise InvalidRecord("wrong_type", f"field 'reward' must be a number, got {type(reward).__name__}")
    elif reward_fn is None:
        raise InvalidRecord("missing_reward", "no 'reward' and no reward function to compute it")
    else:
        try:
            reward = reward_fn(text, prompt)
        except ValueError as e:  # e.g. a checker given a prompt without an answer
            raise InvalidRecord("reward_error", f"the reward function failed: {e}") from None
    if not math.isfinite(reward):
        raise InvalidRecord("nonfinite_reward", f"reward {reward} is not finite")
    return float(reward)


def _routed_experts(fields: dict, tokens: int, num_experts: Optional[int]) -> Optional[np.ndarray]:
    if "routed_experts" not in fields:
        return None
    try:
        experts = np.array(fields["routed_experts"])
    except ValueError:
        experts = None  # ragged nesting
    if experts is None or experts.ndim != 3 or experts.dtype.kind != "i":
        raise InvalidRecord("bad_routed_experts", "'routed_experts' must be a [layers][tokens][k] array of integers")
    if experts.shape[1] != tokens:
        raise InvalidRecord(
            "bad_routed_experts",
            f"'routed_experts' covers {experts.shape[1]} tokens; prompt + completion have {tokens}",
        )
    limit = num_experts if num_experts is not None else np.iinfo(np.int32).max
    if experts.min() < 0 or experts.max() >= limit:
        raise InvalidRecord("bad_routed_experts", f"'routed_experts' holds ids outside [0, {limit})")
    return np.moveaxis(experts, 0, 1).astype(np.int32)  # [tokens, layers, k], the model's replay layout


def _rollout(
    located: Located,
    group: str,
    encoder: Encoder,
    *,
    seq_len: int,
    reward_fn: Optional[RewardFn],
    num_experts: Optional[int],
) -> Rollout:
    fields = located.record.extra
    prompt = dataclasses.replace(located.record, extra={k: v for k, v in fields.items() if k not in ROLLOUT_FIELDS})
    prompt_ids = encode_prompt(prompt, encoder)["prompt"]
    encoder.check_vocab(prompt_ids)
    completion_ids = _completion_ids(fields, encoder)
    logprobs = _logprobs(fields, len(completion_ids), "completion" in fields, encoder.template.eos)
    tokens = len(prompt_ids) + len(completion_ids)
    if tokens > seq_len:
        raise InvalidRecord(
            "too_long",
            f"prompt ({len(prompt_ids)}) + completion ({len(completion_ids)}) tokens exceed seq_len {seq_len}",
        )
    reward = _reward(fields, completion_text(completion_ids, encoder), prompt, reward_fn)
    return Rollout(
        prompt,
        prompt_ids,
        completion_ids,
        logprobs,
        reward,
        group,
        _routed_experts(fields, tokens, num_experts),
        f"{located.path}:{located.line}",
    )


def load_rollouts(
    pattern: str,
    encoder: Encoder,
    *,
    seq_len: int,
    group_size: Optional[int] = None,
    reward_fn: Optional[RewardFn] = None,
    num_experts: Optional[int] = None,
    skip_bad: bool = False,
    stats: Optional[LoadStats] = None,
) -> list[tuple[Rollout, ...]]:
    """The groups of the rollouts files `pattern` names, each a tuple of G rollouts in file order,
    groups in order of first appearance. `reward_fn` fills absent rewards; `num_experts` bounds routed
    expert ids. See the module docstring for the rules and the skip policy."""
    stats = stats if stats is not None else LoadStats()
    groups: dict[tuple, list[Rollout]] = {}
    broken: set[tuple] = set()
    first_routing = ()  # (layers, k) of the first valid rollout's routed experts, None without; () before it
    for located in read_records(pattern, parse_prompt, skip_bad=skip_bad, stats=stats):
        key = None
        try:
            key, name = _group_key(located.record, located.record.extra)
            rollout = _rollout(located, name, encoder, seq_len=seq_len, reward_fn=reward_fn, num_experts=num_experts)
            routing = None if rollout.routed_experts is None else rollout.routed_experts.shape[1:]
            first_routing = routing if first_routing == () else first_routing
            if routing != first_routing:
                raise InvalidRecord(
                    "bad_routed_experts",
                    f"'routed_experts' [layers, k] {routing or 'absent'} where "
                    f"the first rollout has {first_routing or 'none'}; all must match",
                )
        except InvalidRecord as e:
            reject(located, e, skip_bad=skip_bad, stats=stats)
            broken.add(key)
            continue
        groups.setdefault(key, []).append(rollout)
    for key in broken & groups.keys():
        for _ in groups.pop(key):
            stats.skip("incomplete_group")
    kept = _equal_groups(groups, group_size, pattern, skip_bad=skip_bad, stats=stats)
    stats.records_kept += sum(len(group) for group in kept)
    return kept


def _equal_groups(
    groups: dict[tuple, list[Rollout]], group_size: Optional[int], pattern: str, *, skip_bad: bool, stats: LoadStats
) -> list[tuple[Rollout, ...]]:
    """The groups of the expected size; the others raise (naming each with its size and first line)
    or, with skip_bad, are dropped and their records counted under "unequal_group"."""
    sizes = collections.Counter(len(members) for members in groups.values())
    expected = group_size or max(sizes, key=lambda size: (sizes[size], size), default=0)
    odd = [members for members in groups.values() if len(members) != expected]
    if odd and not skip_bad:
        listed = ", ".join(f"{m[0].group!r} has {len(m)} (first at {m[0].where})" for m in odd)
        basis = "group_size" if group_size else f"the size of {sizes[expected]} of {len(groups)} groups"
        raise DataError(
            pattern, f"groups must all have {expected} completions ({basis}): {listed}", reason="unequal_group"
        )
    for members in odd:
        for _ in members:
            stats.skip("unequal_group")
    return [tuple(members) for members in groups.values() if len(members) == expected]


def make_batch(groups: Sequence[Sequence[Rollout]], *, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Whole groups -> one GRPO batch of B = sum of group sizes rows, one rollout per row (prompt then
    completion, then padding), rows of a group adjacent:

    - tokens, loss_mask, segment_ids, positions: int32[B, seq_len] as in SFT batches (data/packing.py):
      loss_mask 1 on completion tokens, segment_ids 1 on tokens and 0 on padding;
    - sampling_logprobs: float32[B, seq_len], at position i the sampling log-prob of token i where
      loss_mask[i] is 1 (0 elsewhere): the alignment of loss_mask. model.losses.shifted_targets pairs
      position i with the prediction of token i+1, so a loss shifts this array the way it shifts
      loss_mask (column i+1 to column i) before comparing it with the trainer's log-probs;
    - rewards: float32[B]; group_ids: int32[B], the group's index in `groups`;
    - routed_experts (when the rollouts carry them): int32[B, seq_len, layers, k], the layout of the
      model's `routed_experts` input: token i's experts at position i; padding positions hold experts
      0..k-1 (valid and distinct, as a router's choice is; padding is never attended to or scored).
    """
    rows = [rollout for group in groups for rollout in group]
    shape = (len(rows), seq_len)
    batch = {
        "tokens": np.full(shape, pad_id, np.int32),
        "loss_mask": np.zeros(shape, np.int32),
        "segment_ids": np.zeros(shape, np.int32),
        "positions": np.zeros(shape, np.int32),
        "sampling_logprobs": np.zeros(shape, np.float32),
        "rewards": np.asarray([r.reward for r in rows], np.float32),
        "group_ids": np.repeat(np.arange(len(groups), dtype=np.int32), [len(g) for g in groups]),
    }
    if rows and rows[0].routed_experts is not None:
        _, layers, k = rows[0].routed_experts.shape
        batch["routed_experts"] = np.broadcast_to(np.arange(k, dtype=np.int32), (len(rows), seq_len, layers, k)).copy()
    for b, rollout in enumerate(rows):
        start, end = len(rollout.prompt_ids), len(rollout.prompt_ids) + len(rollout.completion_ids)
        if end > seq_len:
            raise ValueError(f"{rollout.where or f'row {b}'}: {end} tokens do not fit seq_len {seq_len}")
        batch["tokens"][b, :end] = np.concatenate([rollout.prompt_ids, rollout.completion_ids])
        batch["loss_mask"][b, start:end] = 1
        batch["segment_ids"][b, :end] = 1
        batch["positions"][b, :end] = np.arange(end)
        batch["sampling_logprobs"][b, start:end] = rollout.sampling_logprobs
        if "routed_experts" in batch:
            batch["routed_experts"][b, :end] = rollout.routed_experts
    return batch


def group_advantages(rewards: np.ndarray, groups: np.ndarray, eps: float) -> np.ndarray:
    """rewards [n], group ids [n] -> (r - group mean) / (group std + eps), std over the group (ddof 0);
    a group whose rewards are all equal gets zeros (nothing to prefer)."""
    rewards = np.asarray(rewards, np.float64)
    advantages = np.zeros_like(rewards)
    for group in np.unique(groups):
        members = groups == group
        r = rewards[members]
        advantages[members] = (r - r.mean()) / (r.std() + eps)
    return advantages.astype(np.float32)
