"""Writes the shipped sample rollouts (data/sample/rollouts.jsonl): G completions for each of a few
prompts of data/sample/prompts.jsonl, as an inference engine would hand them over.

Completions alternate between the right answer and a plausible wrong one (data.tasks.wrong_answer),
so every group has rewards to tell apart; most end with the end-of-reply token, a share is cut as by
a length limit. The log-probs are made up (drawn in a range) but
there is one per completion token of the shipped tokenizer, so the file passes validation. The
record forms vary on purpose: ids or text completions, given or computed rewards, explicit or
inferred groups, a plain or a message prompt.

    python scripts/make_sample_rollouts.py [--out data/sample/rollouts.jsonl] [--seed 0]
"""

import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.data import get_config, sample_path  # noqa: E402
from data import tasks  # noqa: E402
from data.pipeline import build_encoder  # noqa: E402

SYSTEM_PROMPT = "Reply with the answer only."
# The record form of each group, cycled: completion as ids or text, reward given or left to the reward
# function, explicit "group" or inferred from the prompt, plain or message prompt.
FORMS = (
    dict(ids=True, reward=True, group=False, messages=False),
    dict(ids=False, reward=True, group=False, messages=False),
    dict(ids=True, reward=False, group=False, messages=False),
    dict(ids=False, reward=False, group=True, messages=True),
)


def _record(rng, prompt, correct, group, form, encoder, args):
    """One rollout of `prompt` in the group's record form."""
    text = prompt["answer"] if correct else tasks.wrong_answer(rng, prompt["answer"])
    ended = rng.random() >= args.share_cut
    eos = encoder.template.eos
    ids = encoder.tokenizer.encode(text) + ([encoder.tokenizer.token_id(eos)] if ended else [])
    record = {"prompt": prompt["prompt"], "answer": prompt["answer"], "task": prompt["task"]}
    if form["messages"]:
        record["prompt"] = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt["prompt"]}]
    if form["ids"]:
        record["completion_ids"] = ids
    else:
        record["completion"] = text + (eos if ended else "")
    record["logprobs"] = [round(rng.uniform(args.min_logprob, 0.0), args.decimals) for _ in ids]
    if form["reward"]:
        record["reward"] = float(text == prompt["answer"])
    if form["group"]:
        record["group"] = group
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=sample_path("rollouts.jsonl"))
    parser.add_argument("--prompts", default=sample_path("prompts.jsonl"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--groups", type=int, default=4, help="prompts, one group each")
    parser.add_argument("--group-size", type=int, default=4, help="completions per prompt (G)")
    parser.add_argument("--share-cut", type=float, default=0.1, help="completions without end-of-reply")
    parser.add_argument("--min-logprob", type=float, default=-3.0)
    parser.add_argument("--decimals", type=int, default=4)
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    encoder = build_encoder(get_config())
    with open(args.prompts, encoding="utf-8") as f:
        prompts = [json.loads(line) for line in f][: args.groups]
    records = []
    for index, prompt in enumerate(prompts):
        form = FORMS[index % len(FORMS)]
        records += [
            _record(rng, prompt, i % 2 == 0, f"sample-{index}", form, encoder, args) for i in range(args.group_size)
        ]
    with open(args.out, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"wrote {len(records)} rollouts ({len(prompts)} groups of {args.group_size}) to {args.out}")


if __name__ == "__main__":
    main()
