"""Command-line tools (run as scripts: python tools/<name>.py) and their shared provenance helpers."""
