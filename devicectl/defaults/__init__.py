"""Packaged defaults (the illustrative clinic policy), read with importlib.resources."""
