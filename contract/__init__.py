"""The run-folder contract shared by the harness and every implementation (depends on nothing of ours)."""
