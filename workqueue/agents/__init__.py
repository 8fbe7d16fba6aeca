"""One adapter per agent CLI (claude, gemini, codex), and `generic` for any command."""

from __future__ import annotations

from workqueue.agents.base import Adapter, AgentOptions, Transcript, Usage
from workqueue.agents.claude import ClaudeAdapter
from workqueue.agents.codex import CodexAdapter
from workqueue.agents.gemini import GeminiAdapter
from workqueue.agents.generic import GenericAdapter

ADAPTERS: dict[str, type[Adapter]] = {
    "generic": GenericAdapter,
    "claude": ClaudeAdapter,
    "gemini": GeminiAdapter,
    "codex": CodexAdapter,
}


def adapter_class(name: str) -> type[Adapter]:
    try:
        return ADAPTERS[name]
    except KeyError:
        raise ValueError(f"unknown adapter {name!r}: use {', '.join(ADAPTERS)}") from None


__all__ = ["ADAPTERS", "Adapter", "AgentOptions", "Transcript", "Usage", "adapter_class"]
