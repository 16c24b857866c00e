"""links.json (``cctview calibrate`` output, ``cctview match --links`` input).

A JSON list of objects ``camera_a``, ``camera_b`` (``camera_a < camera_b``), ``offset_s``
(typical ``frame_ts_b - frame_ts_a`` of the same vehicle), ``spread_s`` (half-width of
the band), ``support``, ``significance``. Several links per camera pair are allowed.
"""
from __future__ import annotations

import json

from transforms.match_blocks import normalize_links

__all__ = ["load_camera_pairs", "load_links", "write_links"]


def _read_json_list(path) -> list:
    """The JSON list in a file at a local path or any Beam filesystem URI."""
    from apache_beam.io.filesystems import FileSystems

    path = str(path)
    with FileSystems.open(path) as f:
        data = json.loads(f.read().decode("utf-8"))
    if not isinstance(data, list):
        raise ValueError("%s: must hold a JSON list, got %s" % (path, type(data).__name__))
    return data


def load_links(path) -> list:
    """Reads and validates a links.json from a local path or any Beam filesystem URI."""
    return normalize_links(_read_json_list(path))


def load_camera_pairs(path) -> list:
    """The camera pairs a JSON list names (objects with ``camera_a`` and ``camera_b``;
    other keys, a links.json's offsets among them, are ignored) -> sorted distinct
    ``(camera_a, camera_b)`` tuples with ``camera_a < camera_b``; from a local path or any
    Beam filesystem URI."""
    data = _read_json_list(path)
    if not data:
        raise ValueError("%s: must hold a non-empty JSON list of camera pairs" % path)
    pairs = set()
    for item in data:
        try:
            a, b = str(item["camera_a"]), str(item["camera_b"])
        except (KeyError, TypeError):
            raise ValueError("bad camera pair %r: needs camera_a and camera_b" % (item,)) from None
        if a == b:
            raise ValueError("bad camera pair %r: camera_a == camera_b" % (item,))
        pairs.add((min(a, b), max(a, b)))
    return sorted(pairs)


def write_links(links, path) -> None:
    """Writes links (validated, sorted by camera pair and offset) as links.json."""
    from apache_beam.io.filesystems import FileSystems

    links = sorted(normalize_links(links) or [],
                   key=lambda l: (l["camera_a"], l["camera_b"], l["offset_s"]))
    with FileSystems.create(str(path)) as f:
        f.write(json.dumps(links, indent=2).encode("utf-8"))
