"""End to end: tests that run Beam pipelines, subprocesses or servers, and the long pure
ones (real models, fuzzing, scale worlds) (``pytest tests/e2e``)."""
