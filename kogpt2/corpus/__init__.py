"""Text in, token ids and training blocks out: the tokenizers, reading data files, the chat layout, packing."""
