"""FixMatch written from scratch: model, loss, optimizer pieces and the training entry point (python -m own_impl.train)."""
