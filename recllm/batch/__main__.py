"""`python -m recllm.batch IN -o OUT` (also under torchrun / accelerate launch: `-m recllm.batch`)."""

import sys

from recllm.batch.run import main

sys.exit(main())
