"""Dataset importers (one module each) and the phantom benchmark."""
