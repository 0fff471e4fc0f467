"""The GPT-2 decoder and what belongs to it alone (config, KV cache, head loss, tied gradient, HF layout); it imports nothing but the base, so it reads and tests alone."""
