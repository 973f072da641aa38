"""Post-training with rewards and preferences: GRPO rollouts from the serving engine in the
training process (`rollout`), reward functions (`rewards`), the objectives (`losses`), the
reference policy's log-probabilities (`reference`). The tasks are `infra.tasks.grpo` and
`infra.tasks.dpo`."""
