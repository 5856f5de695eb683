"""The `fcx` command line: a thin Typer layer over the `fcexport` library."""

import os

# Before anything imports torch (GNU OpenMP reads it once, when torch loads it): torch's idle threads spin for about
# 10,000 turns before they sleep, instead of 300,000. On a machine shared with other work a long spin burns the time
# slice that the thread it waits for needs: with the default, resnet18 ran 1.4x slower beside two busy loops and 2.9x
# beside another torch process, a float64 EfficientNet 1.9x and 18x; on a quiet machine both counts run alike
# (benchmarks/RESULTS.md, "Threads that wait").
# The same threads split the same work either way, so no result changes. A user's own setting wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
