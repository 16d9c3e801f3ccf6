"""`python -m sdtune`: the same as the `sdtune` command."""

import sys

from sdtune.cli.main import main

sys.exit(main())
