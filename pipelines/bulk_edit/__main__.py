"""`python -m pipelines.bulk_edit --config C --edits URI --out URI --job-id ID`."""
import sys

from pipelines.bulk_edit.cli import main

sys.exit(main())
