"""The identity check: our FixMatch and MixMatch run in lockstep with TorchSSL's own training code, from the same
weights on the same batches, every tensor compared after every step (check.py; `python -m identity`)."""
