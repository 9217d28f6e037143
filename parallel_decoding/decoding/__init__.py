"""One forward pass over new tokens, each tagged with its branch: the decoder interface, the eager
reference, the KV arena with its compiled step, and the transformers version shims."""
