"""Third-party implementations we compare against, run unedited from pinned checkouts (see third_party/torchssl)."""
