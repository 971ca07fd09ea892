"""Continuous-batching scheduler. NOTE: this package must never import jax (tests enforce it)."""
