"""The fast loop: pure tests (no Beam pipeline, no subprocess, no server), under a minute
(``pytest tests/unit``; tests/conftest.py refuses a pipeline, subprocess or socket here)."""
