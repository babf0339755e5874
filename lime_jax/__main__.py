"""`python -m lime_jax`: the `lime-jax` command line, for machines without the script."""

import sys

from lime_jax.cli.main import main

sys.exit(main())
