"""Input data for training. The seqio task registry arrives with the data pipeline."""
