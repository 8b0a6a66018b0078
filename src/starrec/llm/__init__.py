"""LLM backends behind one chat interface, structured output, and model loading."""
