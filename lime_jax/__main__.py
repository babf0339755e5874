import sys

from lime_jax.cli.main import main

sys.exit(main())
