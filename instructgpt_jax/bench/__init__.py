"""Benchmarks, run as `python -m instructgpt_jax.bench <name>`; see __main__.py."""
