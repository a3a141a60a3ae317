"""Text to tokens: the tokenizer wrapper and its fingerprints, chat templates with loss masks,
and the `tokenize` transform for text sources read on the fly.

May import `workers`; `transformers` only where a Hub-format tokenizer or a chat template
needs it.
"""
