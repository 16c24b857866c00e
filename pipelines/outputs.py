"""The output folder of a command: checked before, replaced during, summarised after.

A command first proves it can write to ``--output`` (so an unwritable bucket fails in a
second, not after an hour of inference), clears the tables it is about to write (a
re-run replaces, never appends), and after the run makes sure every table folder holds
at least an empty file with its schema.
"""
import uuid

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from runners.errors import UsageError
from transforms import parquet_io

__all__ = ["SORT_KEYS", "TABLES", "check_writable", "finish", "prepare", "table_dir",
           "write", "write_crops"]

# Per table: its schema, the record -> Parquet row builder, and the record's stable id
# and hive partition. Records are keyed and shuffled as the pipeline's own dicts (ints,
# strings, floats: encoded natively) and become rows only in the writer, after the
# grouping: a row's datetimes would be pickled one by one through the shuffle.
TABLES = {
    "detections": (parquet_io.DETECTIONS_SCHEMA, parquet_io.detection_row,
                   lambda r: r["detection_id"],
                   lambda r: parquet_io.hour_partition(int(r["frame_ts_ms"]))),
    "matches": (parquet_io.MATCHES_SCHEMA, parquet_io.match_row,
                lambda r: r["detection_id_a"] + "|" + r["detection_id_b"],
                lambda r: parquet_io.hour_partition(int(r["frame_ts_a_ms"]))),
    "dead_letter": (parquet_io.DEAD_LETTER_SCHEMA, parquet_io.dead_letter_row,
                    lambda r: r["stage"] + "|" + r["uri"], None),
}

# Detections are stored in time order, so a reader of a time range skips row groups.
SORT_KEYS = {"detections": lambda r: (r["frame_ts_ms"], r["detection_id"])}


def table_dir(output: str, table: str) -> str:
    return FileSystems.join(output.rstrip("/"), table)


def check_writable(folder: str) -> None:
    """Writes and deletes a probe file in ``folder``; UsageError where that fails."""
    probe = FileSystems.join(folder.rstrip("/"), ".cctview-write-check-%s" % uuid.uuid4().hex)
    try:
        with FileSystems.create(probe) as handle:
            handle.write(b"ok")
        FileSystems.delete([probe])
    except Exception as exc:  # any filesystem's failure means the same thing here
        raise UsageError("cannot write to output %s (%s)" % (folder, type(exc).__name__))


def prepare(output: str, tables) -> None:
    """Checks that ``output`` is writable and clears ``tables`` under it."""
    if not output:
        raise UsageError("--output is required")
    check_writable(output)
    for table in tables:
        parquet_io.clear_table(table_dir(output, table))


def write(pcoll, output: str, table: str, shards: int = 1, file_prefix: str = "part-"):
    """Writes internal records of ``table`` kind under ``output`` (``file_prefix``: see
    :class:`transforms.parquet_io.WriteParquetTable`)."""
    schema, row_fn, id_fn, partition_fn = TABLES[table]
    return pcoll | "Write_%s" % table >> parquet_io.WriteParquetTable(
        table_dir(output, table), schema, id_fn, partition_fn,
        shards=shards if partition_fn else 1, name=table, file_prefix=file_prefix,
        sort_fn=SORT_KEYS.get(table), row_fn=row_fn)


def finish(output: str, tables) -> None:
    for table in tables:
        if table in TABLES:
            parquet_io.ensure_table(table_dir(output, table), TABLES[table][0])


class _WriteCropFn(beam.DoFn):
    def __init__(self, folder: str):
        self._folder = folder

    def process(self, element):
        record, jpeg = element
        path = "%s/%s/%s.jpg" % (self._folder, parquet_io.hour_partition(record["frame_ts_ms"]),
                                 record["detection_id"])
        with FileSystems.create(path) as handle:
            handle.write(jpeg)
        yield path


def write_crops(crops, output: str):
    """(detection record, JPEG bytes) -> OUTPUT/crops/date=/hour=/<detection_id>.jpg.

    Named by the detection's deterministic id, so a retried bundle overwrites its own
    file."""
    return crops | "WriteCrops" >> beam.ParDo(_WriteCropFn(table_dir(output, "crops")))
