"""Cross-cutting utilities every stage may use: secret scrubbing, no-follow file access, the job folder's file names."""
