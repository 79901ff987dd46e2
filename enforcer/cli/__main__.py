"""`python -m sandgate.enforcer.cli ...`, as the `sandgate` console script."""

import sys

from sandgate.enforcer.cli import main

sys.exit(main())
