"""MARS, the multi-agent teacher: an agent core, the roles' prompts and answers, the
teacher itself, and its evaluation `System`."""
