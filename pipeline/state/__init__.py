"""Keeping state: the answer store, the job folder and what `pipeline status` reads from them."""
