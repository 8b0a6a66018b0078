"""Score-based recommenders every LLM number is compared against."""
