"""ares_jax: ARES (adaptive multimodal reasoning via difficulty-aware entropy shaping) in JAX/Flax."""

__version__ = "0.1.0"
