"""`python -m shardline` is the `shardline` command."""

import sys

from shardline.cli import main

sys.exit(main())
