"""`python -m llava_jax.convert ...`: see llava_jax/convert/__init__.py."""
import sys

from llava_jax.convert import main

sys.exit(main())
