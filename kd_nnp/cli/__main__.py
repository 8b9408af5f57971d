"""``python -m kd_nnp.cli VERB ...`` = ``kd-nnp VERB ...``."""

import sys

from kd_nnp.cli import main

sys.exit(main())
