"""STAR: reasoning-enhanced LLM recommendation (arXiv:2602.09829)."""

import os

# torch and llama.cpp both run OpenMP threads that spin at every sync point by default;
# on a small machine shared with another process that makes decoding 10-150x slower.
# libgomp reads this once, when the first of them loads, so it is set before any import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
