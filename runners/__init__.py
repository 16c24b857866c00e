"""Where the pipelines run: runner presets (``presets.py``, ``--runner_preset``) and the
Dataflow GPU container (``Dockerfile``, ``cloudbuild.yaml``); see ``README.md`` here."""
