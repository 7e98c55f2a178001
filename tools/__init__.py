"""What developers run, not users: speed (bench), the pictures of the docs (figures), simulated
annotators (simulate), the baseline a field user would train (forest). Run as `python -m tools.NAME`."""
