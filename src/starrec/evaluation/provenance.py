"""Where a results JSON came from (DESIGN.md 3.4): the data, the tasks, the system's
configuration and model, the code and the machine, so that a number can be checked
against the inputs that made it and a stale or foreign one is seen to be so."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from starrec.evaluation.identity import RunIdentity, code_version

CPUINFO = Path("/proc/cpuinfo")


def cpu_model(cpuinfo: Path = CPUINFO) -> str | None:
    """The CPU's model name from /proc/cpuinfo where it exists (Linux), else what
    `platform.processor()` says (often empty on Linux, hence the file first)."""
    try:
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Processor", "cpu model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or None


def machine() -> dict[str, Any]:
    """Cores, CPU model and platform: seconds in a results JSON are this machine's."""
    return {"cores": os.cpu_count(), "cpu_model": cpu_model(), "platform": platform.platform()}


def provenance(identity: RunIdentity | None = None, dataset_fingerprint: str | None = None
               ) -> dict[str, Any]:
    """The provenance block of a results JSON. Without an identity only the code and the
    machine are known; a baseline has no model (`model_hash` None)."""
    return {
        "dataset_fingerprint": dataset_fingerprint,
        "tasks_sha256": identity.tasks_sha256 if identity else None,
        "config_hash": identity.config_hash if identity else None,
        "model_hash": identity.model_hash if identity else None,
        "code_version": (identity.code_version if identity and identity.code_version
                         else code_version()),
        "machine": machine(),
    }
