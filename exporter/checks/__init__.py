"""What proves an artifact: parity against the masked reference, the recorded reference, and the manifest."""
