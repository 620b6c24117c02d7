"""The Textual app (`gguflab` with no arguments): see app.py. Only the CLI imports it."""
