"""Shared training machinery: mesh and sharding (more lands with the AEPO stage)."""
