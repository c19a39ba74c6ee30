"""`python -m lorakit`: the same as the `lorakit` command."""
import sys

from .cli import main

sys.exit(main())
