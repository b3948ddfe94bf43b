"""Moved to svd/tools/batch.py; `python -m svd.batch` still runs it."""

from svd.tools.batch import *  # noqa: F403
from svd.tools.batch import main

if __name__ == "__main__":
    raise SystemExit(main())
