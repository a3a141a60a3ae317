"""Ready-made datasets: pre-training (tokenize + pack) and SFT (chat + loss mask + pack)."""
