"""Writes the shipped sample data: SFT train / held-out conversations, preference pairs, prompts.

Deterministic by --seed; held-out prompts never occur in the training file, so held-out accuracy
measures the rule, not memory. Record forms vary on purpose (messages with and without a system
prompt, two-turn conversations, prompt/completion) so the readers see every SFT form.

    python scripts/make_sample_data.py [--out data/sample] [--seed 0]
"""

import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import tasks  # noqa: E402

SYSTEM_PROMPT = "Reply with the answer only."


def _unique_tasks(rng, count, taken):
    """`count` (name, prompt, answer) with prompts not in `taken` (which grows)."""
    out = []
    while len(out) < count:
        name, prompt, answer = tasks.sample(rng)
        if prompt not in taken:
            taken.add(prompt)
            out.append((name, prompt, answer))
    return out


def _sft_record(rng, items, args):
    """One record from one or two tasks, in a form drawn by the configured shares."""
    (_, prompt, answer), *rest = items
    draw = rng.random()
    if draw < args.share_prompt_completion:
        return {"prompt": prompt, "completion": answer}
    messages = []
    if draw < args.share_prompt_completion + args.share_system:
        messages.append({"role": "system", "content": SYSTEM_PROMPT})
    for _, p, a in items:
        messages += [{"role": "user", "content": p}, {"role": "assistant", "content": a}]
    return {"messages": messages}


def _write(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join("data", "sample"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=4000, help="SFT training records")
    parser.add_argument("--heldout", type=int, default=400, help="held-out conversations")
    parser.add_argument("--preference", type=int, default=300, help="preference pairs")
    parser.add_argument("--prompts", type=int, default=300, help="prompts with answers")
    parser.add_argument("--share-prompt-completion", type=float, default=0.2)
    parser.add_argument("--share-system", type=float, default=0.2)
    parser.add_argument("--share-two-turn", type=float, default=0.1)
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    taken: set[str] = set()
    heldout = _unique_tasks(rng, args.heldout, taken)
    train = []
    for _ in range(args.train):
        turns = 2 if rng.random() < args.share_two_turn else 1
        train.append(_sft_record(rng, _unique_tasks(rng, turns, taken), args))
    preference = [
        {"prompt": p, "chosen": a, "rejected": tasks.wrong_answer(rng, a)}
        for _, p, a in _unique_tasks(rng, args.preference, taken)
    ]
    prompts = [{"prompt": p, "answer": a, "task": name} for name, p, a in _unique_tasks(rng, args.prompts, taken)]

    os.makedirs(args.out, exist_ok=True)
    _write(os.path.join(args.out, "sft_train.jsonl"), train)
    _write(
        os.path.join(args.out, "sft_heldout.jsonl"),
        [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]} for _, p, a in heldout],
    )
    _write(os.path.join(args.out, "preference.jsonl"), preference)
    _write(os.path.join(args.out, "prompts.jsonl"), prompts)
    print(
        f"wrote {len(train)} train, {len(heldout)} held-out, {len(preference)} preference, "
        f"{len(prompts)} prompt records to {args.out}"
    )


if __name__ == "__main__":
    main()
