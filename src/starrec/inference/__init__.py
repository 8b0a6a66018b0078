"""A distilled student answering tasks in one pass (tool calls answered mid-generation)."""
