"""The identity check: our FixMatch and MixMatch run in lockstep with a reference's own training code (TorchSSL's
train(), or USB's AlgorithmBase.train() and hooks), from the same weights on the same batches, every tensor compared
after every step (check.py); and USB against TorchSSL the same way (cross.py). `python -m identity`."""
