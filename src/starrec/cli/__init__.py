"""The `star` command line (Typer)."""
