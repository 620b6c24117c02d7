"""The chat pane: talk to a GGUF model with the runner, streaming in a thread worker."""

from .pane import ChatPane

__all__ = ["ChatPane"]
