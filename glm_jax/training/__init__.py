"""Training: loss, optimizer, sharded train state and step."""
