"""Reinforcement learning: verifiable tasks and rewards, rollout actors, GRPO on the one training core."""
