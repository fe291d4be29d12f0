"""Data set importers (one module per published format) and the phantom benchmark generator."""
