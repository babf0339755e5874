"""`python -m lime_jax`: the `lime-jax` command line, for machines without the script."""

from lime_jax.cli.launch import entry

entry()
