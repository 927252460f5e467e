"""What the tests share besides fixtures: data, servers, test models, and the crash and fault harnesses that
``scripts/crasher.py`` and ``scripts/faults.py`` also run at scale."""
