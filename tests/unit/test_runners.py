"""Runner presets, and proof offline that the pipelines build as Dataflow GPU jobs.

The Dataflow tests run the real commands with ``--runner_preset dataflow --dry_run``
against a GCS emulator on loopback (outputs are probed, nothing else is contacted):
the DataflowRunner builds the whole job, and the test reads what would be submitted.
The tests call ``runners.presets.expand_preset`` themselves before ``pipelines.cli.main``
(expansion is idempotent), so they do not depend on where the CLI wires it.
"""
import re

import pytest
from apache_beam.options.pipeline_options import (DebugOptions, GoogleCloudOptions,
                                                  PipelineOptions, StandardOptions,
                                                  WorkerOptions)

from conftest import REPO
from runners.errors import UsageError
from pipelines.options import ModelOptions
from runners.presets import PRESETS, T4_ACCELERATOR, describe, expand_preset

IMAGE = "gcr.io/cctview-test/cctview:1"
PROJECT = "cctview-test"


def test_without_a_preset_argv_is_unchanged_but_a_bare_dry_run_gets_its_value():
    argv = ["match", "--detections", "d", "--output", "o", "--runner", "DirectRunner"]
    assert expand_preset(argv) == argv
    assert expand_preset(["run", "--dry_run", "--output", "o"]) == [
        "run", "--dry_run=True", "--output", "o"]
    assert expand_preset(["run", "--dry_run"]) == ["run", "--dry_run=True"]
    assert expand_preset(["run", "--dry_run", "True"]) == ["run", "--dry_run", "True"]


def test_user_flags_win_aliases_included_and_lists_merge_by_key():
    argv = expand_preset(
        ["run", "--input", "x", "--direct_num_workers", "2", "--runner_preset", "direct"])
    assert "--direct_num_workers=0" not in argv and argv.count("--direct_num_workers") == 1

    l4 = "worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"
    argv = expand_preset(["run", "--input", "x", "--runner_preset", "dataflow",
                          "--sdk_container_image", IMAGE, "--project", PROJECT,
                          "--region", "europe-west4", "--temp_location", "gs://bkt-x/t",
                          "--worker_machine_type", "g2-standard-8",
                          "--dataflow_service_options", l4,
                          "--experiments", "foo", "--device", "cpu", "--max_num_workers=5"])
    options = PipelineOptions(argv[1:])
    assert options.view_as(WorkerOptions).machine_type == "g2-standard-8"
    assert options.view_as(WorkerOptions).max_num_workers == 5
    assert options.view_as(WorkerOptions).disk_size_gb == 100
    assert options.view_as(GoogleCloudOptions).dataflow_service_options == [l4]
    assert sorted(options.view_as(DebugOptions).experiments) == ["foo", "use_runner_v2"]
    assert options.view_as(ModelOptions).device == "cpu"
    assert options.view_as(StandardOptions).runner == "DataflowRunner"
    assert options.view_as(GoogleCloudOptions).region == "europe-west4"


def test_unknown_or_empty_preset_is_refused():
    with pytest.raises(UsageError, match="one of: direct, dataflow"):
        expand_preset(["run", "--runner_preset", "flink"])
    with pytest.raises(UsageError, match="needs a name"):
        expand_preset(["run", "--runner_preset"])


def test_presets_are_documented():
    text = describe()
    readme = (REPO / "runners" / "README.md").read_text()
    for preset in PRESETS.values():
        assert preset.name in text and preset.name in readme
        for flag, value in preset.beam_flags + preset.model_flags:
            assert "%s=%s" % (flag, value) in readme
    assert "--dataflow_service_options=" + T4_ACCELERATOR in PRESETS["dataflow"].argv()


# ------------------------------------------------------------------ the container
def test_dockerfile_matches_the_sdk_it_will_run_with():
    import sys

    import apache_beam

    text = (REPO / "runners" / "Dockerfile").read_text()
    beam_version = re.search(r"ARG BEAM_VERSION=(\S+)", text).group(1)
    assert beam_version == apache_beam.__version__
    assert "FROM apache/beam_python%d.%d_sdk:${BEAM_VERSION}" % sys.version_info[:2] in text
    assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in text
    setup = (REPO / "setup.py").read_text()
    packages = re.search(r"packages=\[([^\]]*)\]", setup).group(1)
    for package in re.findall(r'"(\w+)"', packages):
        assert "COPY %s ./%s" % (package, package) in text
    build = (REPO / "runners" / "cloudbuild.yaml").read_text()
    assert '"-f", "runners/Dockerfile"' in build
