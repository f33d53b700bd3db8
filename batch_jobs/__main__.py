"""`python -m batch_jobs INPUT OUTPUT [...]`: the same as `sdserve batch`."""
import sys

from batch_jobs.cli import main

sys.exit(main())
