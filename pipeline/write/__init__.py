"""Writing outputs: parsing answers into typed rows, part files, results/failures Parquet and the summary."""
