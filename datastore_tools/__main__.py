"""`python -m datastore_tools <command>`: the datastore commands without the full retroserve CLI."""

import os
import sys

from datastore_tools.cli import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.exit(main())
