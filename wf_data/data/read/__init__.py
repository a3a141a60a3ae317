"""Reading rows: plans to token rows (`read_rows`), packed datasets (`pack` = plans + reader),
and the pre-training and SFT datasets built on them.

May import `workers`, `text`, `shards`, `plan` and `mix`.
"""
