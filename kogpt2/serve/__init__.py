"""``generator.py --serve``: the OpenAI-style HTTP API, its request schema and the web page."""
