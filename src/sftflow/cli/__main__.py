"""`python -m sftflow.cli ...` (what torchrun and accelerate launch): the same as `sftflow ...`."""

import sys

from sftflow.cli import main

sys.exit(main())
