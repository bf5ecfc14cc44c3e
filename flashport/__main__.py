"""`python -m flashport ...` runs the `flashport` command."""

import sys

from flashport.cli import main

sys.exit(main())
