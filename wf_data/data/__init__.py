"""Everything from shards to batches: sources, tokenization, packing, mixing, loader."""
