"""A llama.cpp server on this machine (`python -m llama_cpp.server`), for tests, benchmarks
and small deployments.

llama-cpp-python ships an OpenAI-compatible server (its packages: the `llamaserver`
extra). One server process computes one request at a time (a lock around its model);
requests sent to it concurrently wait in its queue. So concurrency against llama.cpp
pays off with several server processes, each an endpoint (`llm.base_url` takes a list),
while vLLM and SGLang batch concurrent requests inside one server.

    with LlamaServer("model.gguf", alias="student") as server:
        model = load_chat_model(server.url, LLMConfig(model="student"))
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

# what `python -m llama_cpp.server` imports beyond llama-cpp-python itself
SERVER_PACKAGES = {"llama_cpp": "llama-cpp-python", "fastapi": "fastapi", "uvicorn": "uvicorn",
                   "sse_starlette": "sse-starlette", "starlette_context": "starlette-context",
                   "pydantic_settings": "pydantic-settings"}


class ServerStartError(RuntimeError):
    """The server exited or did not answer in time; the message ends with its log."""


def missing_server_packages() -> list[str]:
    """The pip names of the server's packages that are not installed (found without
    importing them: llama_cpp loads its native library on import)."""
    return [pip for module, pip in SERVER_PACKAGES.items()
            if importlib.util.find_spec(module) is None]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class LlamaServer:
    """One `llama_cpp.server` process serving `model` (a GGUF) as `alias` on
    `host:port` (a free port when None). `threads` are its compute threads; `n_ctx` its
    context in tokens. `start` returns once `/v1/models` answers; `stop` ends it
    (SIGTERM, then SIGKILL); `kill` ends it as a crash would. The same object can be
    started again on the same port after either."""

    def __init__(self, model: str | Path, *, alias: str = "model", host: str = "127.0.0.1",
                 port: int | None = None, threads: int = 1, n_ctx: int = 4096,
                 log_path: str | Path | None = None, startup_timeout_s: float = 120.0) -> None:
        self.model = Path(model)
        self.alias = alias
        self.host = host
        self.port = port
        self.threads = threads
        self.n_ctx = n_ctx
        self.startup_timeout_s = startup_timeout_s
        self.log_path = Path(log_path) if log_path else Path(
            tempfile.mkstemp(prefix="llama-server-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The OpenAI-compatible base URL (`.../v1`)."""
        return f"http://{self.host}:{self.port}/v1"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model),
                "--model_alias", self.alias, "--host", self.host, "--port", str(self.port),
                "--n_ctx", str(self.n_ctx), "--n_threads", str(self.threads),
                "--n_threads_batch", str(self.threads), "--logits_all", "False",
                "--verbose", "False"]

    def start(self) -> LlamaServer:
        missing = missing_server_packages()
        if missing:
            raise ServerStartError(f"the llama.cpp server needs {', '.join(missing)}: pip "
                                   "install -e .[llamacpp,llamaserver]")
        if not self.model.is_file():
            raise ServerStartError(f"GGUF file not found: {self.model}")
        if self.running:
            return self
        if self.port is None:
            self.port = free_port(self.host)
        with self.log_path.open("ab") as log:
            # its own process group: a stop reaches uvicorn's workers too
            self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        try:
            self.wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self) -> None:
        """Until `/v1/models` lists the alias; `ServerStartError` if the process exits
        first or `startup_timeout_s` passes."""
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if not self.running:
                raise ServerStartError(f"llama.cpp server exited during startup "
                                       f"(code {self.process.returncode if self.process else None})"
                                       f"; its log:\n{self.log_tail()}")
            if self.alias in self.models():
                return
            time.sleep(0.2)
        raise ServerStartError(f"llama.cpp server at {self.url} did not answer within "
                               f"{self.startup_timeout_s:.0f} s; its log:\n{self.log_tail()}")

    def models(self) -> list[str]:
        """The model names `/v1/models` lists; empty while the server does not answer."""
        try:
            with urllib.request.urlopen(f"{self.url}/models", timeout=2) as response:
                return [m.get("id") for m in json.load(response).get("data", [])]
        except (OSError, ValueError, urllib.error.URLError):
            return []

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """End the server at once, as a crash would (SIGKILL)."""
        self._signal(signal.SIGKILL, wait_s=30)

    def stop(self) -> None:
        """End the server: SIGTERM, then SIGKILL after a grace period."""
        if not self._signal(signal.SIGTERM, wait_s=10):
            self.kill()

    def _signal(self, sig: int, wait_s: float) -> bool:
        """Send `sig` to the server's process group; whether it ended within `wait_s`."""
        if self.process is None:
            return True
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass
        try:
            self.process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            return False
        return True

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
