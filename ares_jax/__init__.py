"""ares_jax: ARES (adaptive multimodal reasoning via difficulty-aware entropy shaping) in JAX/Flax."""

from ares_jax import startup_env

__version__ = "0.1.0"

# Before any module of the package imports JAX: no TPU backend (and no libtpu noise) on machines without a TPU.
startup_env.apply()
