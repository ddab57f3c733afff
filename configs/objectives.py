"""Settings of the post-training objectives (`config.objective` picks one; objectives/ implements them).

DeepSeek-V4 post-training ran SFT, then GRPO per domain, then on-policy distillation; GRPO's
hyperparameters are not published ("largely consistent" with V3.2/R1), so the GRPO defaults are the
DeepSeekMath ones (clip 0.2, KL coefficient 0.04, k3 estimator). The data come from
`config.data.preference_sources` (DPO) and `config.data.prompt_sources` (GRPO, distillation). The MoE selection-bias update is off
for DPO and RL: their batches are preference pairs or the policy's own samples, not the data mix the
biases were balanced for.
"""

import ml_collections

NAMES = ("sft", "dpo", "grpo", "distill")  # the values of config.objective; objectives/ builds each


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.dpo = ml_collections.ConfigDict(
        dict(
            beta=0.1,  # scales the policy/reference log-ratio margin
            reference="model",  # "model": the frozen initial weights, run in the step; "data": the
            # pairs' ref_chosen_logps / ref_rejected_logps (score_preferences.py)
            bias_update_rate=0.0,
        )
    )
    config.grpo = ml_collections.ConfigDict(
        dict(
            group_size=4,  # completions per prompt; the global batch holds batch_size / group_size prompts
            clip_low=0.2,  # ratio clipped to [1 - clip_low, 1 + clip_high]
            clip_high=0.2,
            kl_coef=0.04,  # k3 KL to the frozen reference; 0 skips the reference forward
            advantage_eps=1e-6,  # added to the group's reward std
            reward="exact_match",  # trainer/rewards.py registry name
            rollouts="",  # a rollouts JSONL (data/rollouts.py); "" samples with our own model
            temperature=1.0,
            top_p=1.0,
            max_new_tokens=12,
            bias_update_rate=0.0,
            routing_replay=False,  # train on the experts the rollouts recorded per token and layer
        )
    )
    config.distill = ml_collections.ConfigDict(
        dict(
            teacher="",  # workdir of the teacher's Orbax checkpoint (same architecture)
            temperature=1.0,
            top_p=1.0,
            max_new_tokens=12,
            bias_update_rate=0.0,
        )
    )
    return config
