"""Metrics, the evaluation loop and result reports (DESIGN.md 3.4)."""
