"""Which optional extra of the `starrec` distribution brings which package.

`pip install starrec` runs the data, the baselines and the cst ranker; the LLM backends,
training, serving and the out-of-core engines come with extras (pyproject.toml). A
command that reaches a package of a missing extra names the extra to install.
"""

from __future__ import annotations

# top-level import name -> extra of pyproject.toml's optional-dependencies
EXTRA_OF: dict[str, str] = {
    "openai": "llm",
    "gguf": "llm",
    "trl": "train",
    "peft": "train",
    "datasets": "train",
    "accelerate": "train",
    "matplotlib": "train",
    "llama_cpp": "llamacpp",
    "sse_starlette": "llamaserver",
    "starlette_context": "llamaserver",
    "pydantic_settings": "llamaserver",
    "fastapi": "serve",
    "uvicorn": "serve",
    "duckdb": "scale",
    "pyspark": "spark",
}


def missing_extra(error: ImportError) -> str | None:
    """A one-line hint for an import that failed because an extra is not installed, or
    None where the missing module belongs to no extra (a broken install, a bug)."""
    name = (getattr(error, "name", None) or "").split(".")[0]
    extra = EXTRA_OF.get(name)
    if extra is None:
        return None
    return (f"this needs the '{name}' package, which is not installed: "
            f"pip install 'starrec[{extra}]'")
