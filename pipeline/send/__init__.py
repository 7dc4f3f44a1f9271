"""Sending requests: the network seam (transport), limits (limits, buckets), the one classifier
(classify), retry decisions (retry), cost and budget (budget), endpoint health (health), counters
(stats), and the retry loop that ties them together (dispatch)."""
