"""From a prompt to text: sampling functions, decoding steps, the engine, the prompt and chat loops, outputs, the copy report."""
