"""python -m dipfast.bench throughput|time-to-psnr|quality|summary [...]"""

import sys

from dipfast.bench.cli import main

sys.exit(main())
