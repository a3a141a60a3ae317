"""Mixing domains at row level: static weights or the EXP3 bandit of Online Data Mixing, its
rewards, and `MixtureFeedback`, the one path from the trainer's per-domain loss back to the
mixture.

May import `workers`, `text`, `shards` and `plan`.
"""
