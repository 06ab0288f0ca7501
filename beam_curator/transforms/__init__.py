"""One module per stage, each a thin PTransform around models/ and dedup/."""
