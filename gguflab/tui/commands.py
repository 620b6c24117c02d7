"""The command palette (Ctrl+P): every app action by name, with the key that runs it."""

from __future__ import annotations

from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider

# (title, help, action, key)
COMMANDS = [
    ("Models tab", "The model browser", "tab('models')", "1"),
    ("Jobs tab", "Running and finished jobs, logs and histograms", "tab('jobs')", "2"),
    ("Chat tab", "Chat with a GGUF model", "tab('chat')", "3"),
    ("Sweep tab", "Size / perplexity / KLD table of quant types", "tab('sweep')", "4"),
    ("Rescan models", "Look for models in the folders again", "rescan", "r"),
    ("Quantize selected model", "Choose a type (Q4_K_M, Q8_0, ...) and quantize", "quantize", "k"),
    (
        "Importance matrix of selected model",
        "Collect an imatrix over a text, for the i-quants and better low-bit types",
        "imatrix",
        "i",
    ),
    ("Convert selected HF folder", "Hugging Face checkpoint to GGUF", "convert", "c"),
    (
        "Perplexity / KLD of selected model",
        "Measure on the shipped text or a file",
        "perplexity",
        "p",
    ),
    (
        "Sweep quant types of selected model",
        "Quantize to several types and measure each",
        "sweep",
        "s",
    ),
    ("Open selected model in chat", "Load it in the Chat tab", "chat", "o"),
    ("Toggle tensor table", "The selected model's tensors, or its info", "tensors", "t"),
    ("Quit", "Cancel running jobs and leave", "quit", "q"),
]


class ModelCommands(Provider):
    """The app's own actions, so that every one can be found by name."""

    async def discover(self) -> Hits:
        for title, help_text, action, key in COMMANDS:
            yield DiscoveryHit(
                f"{title} ({key})", partial(self.app.run_action, action), help=help_text
            )

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, help_text, action, key in COMMANDS:
            score = matcher.match(title)
            if score > 0:
                yield Hit(
                    score,
                    matcher.highlight(f"{title} ({key})"),
                    partial(self.app.run_action, action),
                    help=help_text,
                )
