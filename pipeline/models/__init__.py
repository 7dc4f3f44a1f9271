"""Model facts: prices, and what each model can do."""
