"""Planning rows from document lengths only: seeded lazy permutations per epoch, concat and
best-fit row plans, and global batch plans. Plans carry no tokens.

May import `workers`, `text` and `shards`.
"""
