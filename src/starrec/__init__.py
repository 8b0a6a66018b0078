"""STAR: reasoning-enhanced LLM recommendation (arXiv:2602.09829)."""

__version__ = "0.1.0"
