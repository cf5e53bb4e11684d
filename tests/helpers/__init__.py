"""What the tests share: worker pools, process helpers, reference data, tiny models."""
