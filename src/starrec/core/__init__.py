"""The bottom layer: records and protocols every other package shares.

Nothing here imports another package of `starrec`, so any package may import it; what
two packages both need lives here rather than in either (tests/test_layers.py keeps the
layers pointing one way).
"""

from starrec.core.systems import (
    CompletedRanking,
    FitData,
    Recommendation,
    Recommender,
    System,
    complete_ranking,
    ranked,
    score_order,
    target_rank,
)
from starrec.core.task import SHORT_SCENARIOS, Task
from starrec.core.tool_calls import ParseError, ToolCall, parse_tool_call, render_tool_call

__all__ = [
    "CompletedRanking",
    "FitData",
    "ParseError",
    "Recommendation",
    "Recommender",
    "SHORT_SCENARIOS",
    "System",
    "Task",
    "ToolCall",
    "complete_ranking",
    "ranked",
    "score_order",
    "target_rank",
    "parse_tool_call",
    "render_tool_call",
]
