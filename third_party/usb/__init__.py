"""USB's (microsoft/Semi-supervised-learning, TorchSSL's successor) FixMatch and MixMatch as a second reference: the
pin and its checkout (checkout.py), the stand-ins for packages it imports but never calls here (stand_ins.py), the
run-time patches (patches.py), and the subprocess entry that runs it on one of our run folders (entry.py).

Only checkout.py and patches.py may be imported outside the entry's subprocess: neither imports torch nor USB.
"""
