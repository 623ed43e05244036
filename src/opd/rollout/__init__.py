"""Samplers (Hugging Face generate, vLLM) and the rollout batch pieces they share."""
