"""`epo-tui bench`: how fast the search runs (speed.py, with its FLOP counts in flops.py against the
matmul peak of peak.py; shapes.py at real model shapes), how good its prompts are against the held-out
text (quality.py), and how fast the UI answers while a search runs (ui_latency.py). report.py is what
they share: progress, the machine, goal tables. Importing this package loads neither JAX nor pyte: each
module loads what it measures when it runs."""
