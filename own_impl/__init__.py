"""FixMatch and MixMatch written from scratch: model, augmentations, algorithms, optimizer pieces and the training
entry point (python -m own_impl.train)."""
