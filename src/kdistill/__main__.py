"""``python -m kdistill ...`` (also: ``accelerate launch -m kdistill run config.yaml`` on many GPUs)."""

import sys

from kdistill.cli import main

sys.exit(main())
