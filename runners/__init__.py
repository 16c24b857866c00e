"""Where the pipelines run: runner presets (``presets.py``, ``--runner_preset``), the
Dask runner (``dask_runner.py``), the error types every layer raises for the CLI to
report in one line (``errors.py``: runners sit at the bottom of the imports, so all
may use them) and the Dataflow GPU container (``Dockerfile``, ``cloudbuild.yaml``);
see ``README.md`` here."""
