"""Runner presets, and proof offline that the pipelines build as Dataflow GPU jobs.

The end-to-end half (Beam pipelines, servers, the long cases); the pure half, the
module's full description and the helpers both use are in tests/unit/test_runners.py.
"""

import pytest

from conftest import upload_tree
from pipelines import cli
from runners.errors import UsageError
from runners.presets import T4_ACCELERATOR, expand_preset

from unit.test_runners import IMAGE, PROJECT


def _dataflow_flags(bucket: str):
    return ["--runner_preset", "dataflow", "--sdk_container_image", IMAGE,
            "--project", PROJECT, "--region", "us-central1",
            "--temp_location", "gs://%s/tmp" % bucket, "--dry_run"]


# ------------------------------------------------------------------ expansion
def test_direct_preset_runs_and_writes_what_the_default_runner_writes(small_world, tmp_path):
    """`cctview run --runner_preset direct` (worker threads, one model thread each) on the
    synthetic world: the same detections and matches as the DirectRunner's default."""
    import pyarrow.dataset as ds

    from conftest import CLASSICAL

    def tables(out):
        return [sorted(ds.dataset(str(out / name), partitioning="hive").to_table(
            columns=columns).to_pylist(), key=str)
                for name, columns in (("detections", ["detection_id", "score", "box_xyxy"]),
                                      ("matches", ["detection_id_a", "detection_id_b"]))]

    base = ["run", "--input", str(small_world / "frames"), "--max-gap", "60"] + CLASSICAL
    assert cli.main(base + ["--output", str(tmp_path / "default")]) == 0
    assert cli.main(expand_preset(base + ["--output", str(tmp_path / "preset"),
                                          "--runner_preset", "direct"])) == 0
    default, preset = tables(tmp_path / "default"), tables(tmp_path / "preset")
    assert default[0] and default[1] and preset == default


def test_direct_preset_expands_to_every_core_in_worker_threads():
    argv = expand_preset(["run", "--input", "x", "--runner_preset", "direct"])
    assert argv == ["run", "--input", "x", "--runner=DirectRunner",
                    "--direct_running_mode=multi_threading", "--direct_num_workers=0"]
    assert expand_preset(["run", "--runner_preset=direct"]) == argv[:1] + argv[3:]
    _, options = cli.parse(argv + ["--output", "o"])
    assert options.get_all_options()["direct_num_workers"] == 0
    assert options.get_all_options()["direct_running_mode"] == "multi_threading"


def test_model_flags_only_for_commands_that_run_models():
    base = ["--runner_preset", "dataflow", "--sdk_container_image", IMAGE, "--project",
            PROJECT, "--region", "r", "--temp_location", "gs://bkt-x/t"]
    assert "--device=cuda" in expand_preset(["run"] + base)
    assert "--device=cuda" in expand_preset(["extract"] + base)
    assert "--device=cuda" in expand_preset(base)  # backfill passes flags only
    matched = expand_preset(["match", "--detections", "d", "--output", "o"] + base)
    assert not any(t.startswith("--device") for t in matched)
    cli.parse(matched)  # 'match' takes every flag the preset added


def test_dataflow_preset_without_container_image_fails_with_one_line(world, capsys):
    with pytest.raises(UsageError) as info:
        expand_preset(["run", "--input", "gs://bkt-x/f/**", "--runner_preset", "dataflow",
                       "--project", PROJECT, "--region", "r", "--temp_location", "gs://bkt-x/t"])
    message = str(info.value)
    assert "--sdk_container_image" in message and "\n" not in message
    assert "--project" not in message  # only what is missing is named
    # The same through a command: one line on stderr, exit status 2.
    code = cli.main(["backfill", "--input", str(world), "--start", "2024-05-01T12:00:00",
                          "--end", "2024-05-01T12:01:00", "--output", "unused",
                          "--runner_preset", "dataflow"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("cctview backfill: error: --runner_preset dataflow needs "
                          "--sdk_container_image")


# ------------------------------------------------------------------ Dataflow dry runs
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    assert cli.main(["synth", "--output", str(root), "--cameras", "2", "--minutes", "1",
                     "--fps", "0.2"]) == 0
    return root / "frames"


@pytest.fixture
def dataflow_jobs(monkeypatch, gcs_server):
    """Captures the jobs the DataflowRunner builds; GCS credentials = anonymous at once.

    Beam looks for Google credentials with retries (~20 s) before it connects
    anonymously, which is what the emulator wants; the lookup is skipped here.
    """
    from apache_beam.internal.gcp import auth
    from apache_beam.runners.dataflow import dataflow_runner

    monkeypatch.setattr(auth._Credentials, "_get_service_credentials",
                        staticmethod(lambda options: None))
    jobs = []
    original = dataflow_runner.DataflowRunner.run_pipeline

    def run_pipeline(self, pipeline, options):
        result = original(self, pipeline, options)
        jobs.append(result.job)
        return result

    monkeypatch.setattr(dataflow_runner.DataflowRunner, "run_pipeline", run_pipeline)
    return jobs


def _environment(job):
    """The Environment Dataflow would receive, made by Beam's own code, offline."""
    from apache_beam.runners.dataflow.internal import apiclient

    return apiclient.Environment(
        packages=[], options=job.options,
        environment_version=apiclient._FNAPI_ENVIRONMENT_MAJOR_VERSION,
        proto_pipeline_staged_url="gs://staging/pipeline.pb",
        proto_pipeline=job.proto_pipeline).proto


def _inference_handlers(job):
    """The ModelHandlers inside the job's RunInference steps, unpickled from the proto."""
    from apache_beam.internal import pickler
    from apache_beam.portability import common_urns
    from apache_beam.portability.api import beam_runner_api_pb2

    handlers = []
    for transform in job.proto_pipeline.components.transforms.values():
        if (transform.spec.urn == common_urns.primitives.PAR_DO.urn
                and transform.unique_name.endswith("ParDo(_RunInferenceDoFn)")):
            payload = beam_runner_api_pb2.ParDoPayload.FromString(transform.spec.payload)
            fn = pickler.loads(payload.do_fn.payload)[0]
            handlers.append(getattr(fn, "_fn", fn)._model_handler)
    return handlers


def test_run_builds_a_complete_dataflow_gpu_job_offline(gcs_server, dataflow_jobs, capsys):
    bucket = gcs_server()
    argv = expand_preset(
        ["run", "--input", "gs://%s/frames/**" % bucket, "--output", "gs://%s/out" % bucket,
         "--detector", "background", "--embedder", "color_histogram"]
        + _dataflow_flags(bucket))
    assert cli.main(argv) == 0
    assert "dry run: job built" in capsys.readouterr().out
    (job,) = dataflow_jobs
    names = {t.unique_name for t in job.proto_pipeline.components.transforms.values()}
    for stage in ("ReadFrames", "ReadFrames/List", "ReadFrames/ParseAndDecode",
                  "DetectFrames", "DetectFrames/Backgrounds",
                  "DetectFrames/Detect/BeamML_RunInference", "Match", "Match/GroupBlocks",
                  "Write_detections/WriteFile", "Write_matches/WriteFile",
                  "Write_dead_letter/WriteFile"):
        assert stage in names, stage
    # Every step runs in the project's container.
    for env in job.proto_pipeline.components.environments.values():
        assert env.urn == "beam:env:docker:v1"
        assert IMAGE.encode() in env.payload
    environment = _environment(job)
    assert list(environment.service_options) == [T4_ACCELERATOR]
    assert "use_runner_v2" in environment.experiments
    (pool,) = environment.worker_pools
    assert pool.machine_type == "n1-standard-8" and pool.disk_size_gb == 100
    assert pool.autoscaling_settings.max_num_workers == 20
    assert pool.worker_harness_container_image == IMAGE
    assert [c.container_image for c in pool.sdk_harness_container_images] == [IMAGE]
    sdk_options = dict(environment.sdk_pipeline_options["options"])
    assert sdk_options["device"] == "cuda" and sdk_options["project"] == PROJECT
    # One model copy per GPU: the handler runs on cuda and is shared across processes.
    (handler,) = _inference_handlers(job)
    assert handler.share_model_across_processes()
    model_handler = handler._unkeyed  # under the background wrapper, if any
    assert getattr(model_handler, "_base", model_handler)._device == "cuda"


def test_backfill_builds_its_first_job_on_dataflow_offline(gcs_server, dataflow_jobs, world,
                                                          capsys):
    """gs:// frames in the CCTView layout: the driver lists camera folders, then builds
    the first partition's job; nothing is executed or committed."""
    bucket = gcs_server()
    client_bucket = gcs_server.client.bucket(bucket)
    uploaded = upload_tree(world, lambda path, data: client_bucket.blob(
        "frames/" + path).upload_from_string(data))
    assert uploaded >= 20
    code = cli.main(
        ["backfill", "--input", "gs://%s/frames" % bucket, "--start", "2024-05-01T12:00:00",
         "--end", "2024-05-01T12:01:00", "--chunk", "15m", "--output",
         "gs://%s/backfill" % bucket, "--detector", "background", "--embedder",
         "color_histogram"] + _dataflow_flags(bucket))
    assert code == 0
    assert "dry run: job 1 of 1 built" in capsys.readouterr().out
    (job,) = dataflow_jobs
    names = {t.unique_name for t in job.proto_pipeline.components.transforms.values()}
    for stage in ("ReadFrames/Patterns", "DetectFrames", "OneDeadLetterPerFile", "Match",
                  "Owned_0", "Write_detections", "Write_dead_letter"):
        assert any(n == stage or n.startswith(stage + "/") for n in names), stage
    assert any(n.startswith("Matches_20240501T120000Z-20240501T120100Z/Write_matches")
               for n in names)
    assert list(_environment(job).service_options) == [T4_ACCELERATOR]
    assert not list(gcs_server.client.list_blobs(bucket, prefix="backfill/_backfill/"))


def test_dry_run_does_not_read_weights_from_object_storage(gcs_server, dataflow_jobs, capsys):
    """A user's dry run with gs:// weights: the weight check that needs the network is
    skipped with one line, and the job is still built with those weights in it. (The
    weights do not exist: checking them would stop the command.)"""
    bucket = gcs_server()
    detector, embedder = ("gs://%s/weights/%s.onnx" % (bucket, name)
                          for name in ("yolox_nano", "osnet_x0_25"))
    argv = expand_preset(
        ["run", "--input", "gs://%s/frames/**" % bucket, "--output", "gs://%s/out" % bucket,
         "--detector", "yolox", "--detector-weights", detector,
         "--embedder", "onnx", "--embedder-weights", embedder] + _dataflow_flags(bucket))
    assert cli.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert ("dry run: model weights not checked (reading %s, %s needs the network)"
            % (detector, embedder)) in out
    assert "dry run: output gs://%s/out not checked (probing it needs the network)" % (
        bucket) in out
    assert "dry run: job built, nothing executed" in out
    (job,) = dataflow_jobs
    (handler,) = _inference_handlers(job)
    assert handler._unkeyed._detector[:2] == ("yolox", detector)
    assert handler._unkeyed._embedder[:2] == ("onnx", embedder)


def test_without_dry_run_missing_weights_in_object_storage_stop_the_command(gcs_server,
                                                                          capsys):
    bucket = gcs_server()
    code = cli.main(["extract", "--input", "gs://%s/frames/**" % bucket, "--output",
                     "gs://%s/out" % bucket, "--detector", "yolox", "--detector-weights",
                     "gs://%s/weights/none.onnx" % bucket, "--embedder", "color_histogram"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == ("cctview extract: error: weights not found: "
                                 "gs://%s/weights/none.onnx" % bucket)


def test_dry_run_leaves_earlier_outputs_alone(gcs_server, dataflow_jobs, tmp_path, capsys):
    bucket = gcs_server()
    earlier = tmp_path / "out" / "detections" / "part-00000.parquet"
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"an earlier run's table")
    argv = expand_preset(["extract", "--input", "gs://%s/frames/**" % bucket,
                          "--output", str(tmp_path / "out"), "--detector", "background",
                          "--embedder", "color_histogram"] + _dataflow_flags(bucket))
    assert cli.main(argv) == 0
    assert "dry run: job built, nothing executed" in capsys.readouterr().out
    assert len(dataflow_jobs) == 1
    assert earlier.read_bytes() == b"an earlier run's table"
