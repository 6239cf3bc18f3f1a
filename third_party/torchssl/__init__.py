"""TorchSSL's FixMatch as the reference: the pin and its checkout (checkout.py), the run-time patches (patches.py),
and the subprocess entry that runs it on one of our run folders (entry.py).

Only checkout.py may be imported outside the entry's subprocess: it imports neither torch nor TorchSSL.
"""
