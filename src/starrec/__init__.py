"""STAR: reasoning-enhanced LLM recommendation (arXiv:2602.09829).

The library API (`starrec.experiment`) is reachable from here:

    import starrec
    tasks = starrec.load_task_set("ml-100k", users="eval-200")
    result = starrec.evaluate("pop", tasks)

Its names are imported on first use, so `import starrec` stays light (no pandas, torch
or transformers until a call needs them).
"""

import os
from typing import TYPE_CHECKING, Any

# torch and llama.cpp both run OpenMP threads that spin at every sync point by default;
# on a small machine shared with another process that makes decoding 10-150x slower.
# libgomp reads this once, when the first of them loads, so it is set before any import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# the names of `starrec.experiment` offered at the top level
_API = ("TaskSet", "Evaluation", "prepare_tasks", "load_task_set", "evidence_store",
        "make_system", "evaluate", "evaluate_with_subset")
__all__ = ["__version__", *_API]

if TYPE_CHECKING:
    from starrec.experiment import (  # noqa: F401
        Evaluation,
        TaskSet,
        evaluate,
        evaluate_with_subset,
        evidence_store,
        load_task_set,
        make_system,
        prepare_tasks,
    )


def __getattr__(name: str) -> Any:
    """The library API's names, imported when first asked for (PEP 562)."""
    if name in _API:
        from starrec import experiment

        return getattr(experiment, name)
    raise AttributeError(f"module 'starrec' has no attribute {name!r}")
