"""Compiled rollout engine: prefill + decode loop with exact entropy, window entropy and HWE branching."""

from ares_jax.sampling.config import Rollouts, SamplingConfig
from ares_jax.sampling.distributions import restrict_support, scaled_log_probs, token_entropy
from ares_jax.sampling.chunks import generate

__all__ = ["Rollouts", "SamplingConfig", "generate", "restrict_support", "scaled_log_probs", "token_entropy"]
