"""Collaborative Signal Translation: CF signals as natural-language evidence and tools."""
