"""`python -m lorabatch.cli`: the same as the `lorabatch` command."""

import sys

from lorabatch.cli.main import main

sys.exit(main())
