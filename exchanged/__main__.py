"""`python -m exchanged` is the `exchanged` command."""

import sys

from exchanged.cli import main

sys.exit(main())
