"""Sending requests: the network seam, limits, classification and the retry loop."""
