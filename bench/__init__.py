"""twinstream's benchmark: quality against the baselines a user would pick, and speed as ratios
measured in the same run. ``python -m bench --help``; see docs/bench.md."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never reach for a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
