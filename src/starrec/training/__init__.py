"""Fine-tuning a student on serialized teacher trajectories (SFT; GRPO builds on it)."""
