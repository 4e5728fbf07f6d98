"""`python -m recllm ...` runs the command line."""

import sys

from recllm.cli import main

sys.exit(main())
