"""Building requests: rows -> prompts (templates, images) -> structured shaping -> one immutable Request each."""
