"""`python -m lorakit.cli`: the same as `python -m lorakit` (torchrun and accelerate launch take either)."""
import sys

from . import main

sys.exit(main())
