"""Third-party implementations we compare against, each run unedited from a pinned, verified checkout: TorchSSL
(third_party/torchssl) and USB (third_party/usb). What both share: checkout.py (the pin and the checkout) and
adapter.py (the pieces of both adapters)."""
