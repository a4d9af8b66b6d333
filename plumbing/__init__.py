"""The machinery behind common.py: overrides, hardware and processes, files, the run, data and images."""
