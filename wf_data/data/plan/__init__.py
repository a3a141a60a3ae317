"""Planning rows from document lengths only: seeded lazy permutations per epoch, concat and
best-fit row plans, and global batch plans. Plans carry no tokens.

May import `workers`, `text` and `shards`. This `__init__` imports nothing, so the reading
stage takes the plan schema from it without importing Grain.
"""

# The per-piece arrays of a row plan, (P,) int64 each: piece i of the row is tokens
# [offsets[i], offsets[i] + lengths[i]) of document doc_ids[i].
PLAN_KEYS = ("doc_ids", "offsets", "lengths")
