"""Folder-level listing on object stores, which Beam's FileSystems does not offer.

Beam's ``FileSystems.match`` lists every object under a pattern's prefix. To select a
time range without listing months of footage, the driver needs the camera folders
under a root: one delimiter listing (one level, no objects), done here per scheme.
"""
import os
from typing import List, Optional

__all__ = ["list_child_folders"]


def _split_bucket(uri: str, scheme: str):
    rest = uri[len(scheme):]
    bucket, _, prefix = rest.partition("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return bucket, prefix


def _gcs_children(uri: str, project: Optional[str]) -> List[str]:
    from google.cloud import storage  # imported here: only gs:// inputs need it

    bucket, prefix = _split_bucket(uri, "gs://")
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        client = storage.Client(project=project or "local", credentials=AnonymousCredentials())
    else:
        client = storage.Client(project=project)
    blobs = client.list_blobs(bucket, prefix=prefix, delimiter="/")
    for _ in blobs.pages:
        pass  # the prefixes are filled in while pages are read
    return sorted("gs://%s/%s" % (bucket, p.rstrip("/")) for p in blobs.prefixes)


def _s3_children(uri: str, s3_options) -> List[str]:
    import boto3  # imported here: only s3:// inputs need it

    opts = s3_options.get_all_options() if s3_options is not None else {}
    client = boto3.client(
        "s3",
        endpoint_url=opts.get("s3_endpoint_url"),
        aws_access_key_id=opts.get("s3_access_key_id"),
        aws_secret_access_key=opts.get("s3_secret_access_key"),
        region_name=opts.get("s3_region_name"),
        verify=opts.get("s3_verify"),
    )
    bucket, prefix = _split_bucket(uri, "s3://")
    children = []
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix, Delimiter="/"
    ):
        children.extend(p["Prefix"] for p in page.get("CommonPrefixes", []))
    return sorted("s3://%s/%s" % (bucket, p.rstrip("/")) for p in children)


def list_child_folders(uri: str, pipeline_options=None) -> List[str]:
    """The immediate sub-folders of ``uri`` (local path, gs:// or s3://), sorted."""
    uri = uri.rstrip("/")
    if uri.startswith("gs://"):
        project = None
        if pipeline_options is not None:
            from apache_beam.options.pipeline_options import GoogleCloudOptions

            project = pipeline_options.view_as(GoogleCloudOptions).project
        return _gcs_children(uri, project)
    if uri.startswith("s3://"):
        s3_options = None
        if pipeline_options is not None:
            from apache_beam.options.pipeline_options import S3Options

            s3_options = pipeline_options.view_as(S3Options)
        return _s3_children(uri, s3_options)
    if "://" in uri:
        raise ValueError("time-range listing supports local, gs:// and s3:// roots, not %s" % uri)
    if not os.path.isdir(uri):
        return []
    return sorted(
        os.path.join(uri, entry.name) for entry in os.scandir(uri) if entry.is_dir()
    )
