"""Stage implementations dispatched by `ares_jax.main` on `config.stage`."""
