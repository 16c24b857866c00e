"""ReadDetections: stored detections Parquet (ours, CCTView's, anyone's) -> detection dicts.

This is what lets matching be re-run without touching frames or models: any Parquet
with ``camera_id``, ``frame_ts`` (timestamp; naive = ``timezone``), ``detection_id``
and ``embedding`` (list or fixed_size_list of float16/float32) is accepted; ``label``,
``score``, ``box_xyxy``, ``frame_uri`` are carried along when present.
"""
from typing import List, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import TimestampedValue

NAMESPACE = "cctview"
REQUIRED_COLUMNS = ("camera_id", "frame_ts", "detection_id", "embedding")
OPTIONAL_COLUMNS = ("label", "score", "box_xyxy", "frame_uri", "detector", "embedder")


class DetectionsSchemaError(ValueError):
    """A Parquet file without the columns that matching needs."""


def parquet_files(paths: Sequence[str]) -> List[str]:
    """Expands files and folders (local or Beam URIs) into the Parquet files inside."""
    files = []
    for path in paths:
        if path.endswith(".parquet") or any(c in path for c in "*?["):
            pattern = path
        else:
            pattern = path.rstrip("/") + "/**"
        for metadata in FileSystems.match([pattern])[0].metadata_list:
            name = metadata.path.rsplit("/", 1)[-1]
            if name.endswith(".parquet") and not name.startswith((".", "_")):
                files.append(metadata.path)
    return sorted(set(files))


def _epoch_ms(column: pa.ChunkedArray, timezone: str) -> np.ndarray:
    if not pa.types.is_timestamp(column.type):
        raise DetectionsSchemaError("frame_ts must be a timestamp, not %s" % column.type)
    if column.type.tz is None:
        column = pc.assume_timezone(column, timezone, ambiguous="earliest",
                                    nonexistent="earliest")
    return column.cast(pa.timestamp("ms", tz="UTC")).cast(pa.int64()).to_numpy()


def _flat_values(column) -> np.ndarray:
    """The list column's values as float16 when stored so (CCTView's reference files:
    matching converts once, block by block, and ships float16 between stages, so a
    float32 copy here would only be converted back), else float32."""
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return flat if flat.dtype == np.float16 else flat.astype(np.float32)


def _embeddings(column: pa.ChunkedArray) -> List[np.ndarray]:
    column = column.combine_chunks()
    if pa.types.is_fixed_size_list(column.type):
        return list(_flat_values(column).reshape(-1, column.type.list_size))
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        offsets = column.offsets.to_numpy()
        flat = _flat_values(column)
        return [flat[offsets[i]:offsets[i + 1]] for i in range(len(column))]
    raise DetectionsSchemaError("embedding must be a list column, not %s" % column.type)


def table_to_detections(table: pa.Table, timezone: str = "UTC") -> List[dict]:
    """Normalises one table of stored detections into detection dicts."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise DetectionsSchemaError("missing column(s) %s" % ", ".join(missing))
    table = table.filter(pc.is_valid(table["embedding"]))
    ts = _epoch_ms(table["frame_ts"], timezone)
    embeddings = _embeddings(table["embedding"])
    cameras = table["camera_id"].to_pylist()
    ids = table["detection_id"].to_pylist()
    extra = {c: table[c].to_pylist() for c in OPTIONAL_COLUMNS if c in table.column_names}
    rows = []
    for i in range(table.num_rows):
        row = {"camera_id": str(cameras[i]), "frame_ts_ms": int(ts[i]),
               "detection_id": str(ids[i]), "embedding": embeddings[i]}
        for name, values in extra.items():
            row[name] = values[i]
        rows.append(row)
    return rows


class _ReadFileFn(beam.DoFn):
    def __init__(self, timezone: str, batch_rows: int):
        self._timezone = timezone
        self._batch_rows = batch_rows
        self.rows = Metrics.counter(NAMESPACE, "detections_read")

    def process(self, path):
        with FileSystems.open(path) as handle:
            parquet = pq.ParquetFile(handle)
            columns = [c for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS
                       if c in parquet.schema_arrow.names]
            for batch in parquet.iter_batches(batch_size=self._batch_rows, columns=columns):
                try:
                    rows = table_to_detections(pa.Table.from_batches([batch]), self._timezone)
                except DetectionsSchemaError as exc:
                    raise DetectionsSchemaError("%s: %s" % (path, exc)) from exc
                self.rows.inc(len(rows))
                for row in rows:
                    yield TimestampedValue(row, row["frame_ts_ms"] / 1000.0)


def camera_ids(files: Sequence[str]) -> List[str]:
    """The distinct camera ids in ``files``, reading only that column."""
    cameras = set()
    for path in files:
        with FileSystems.open(path) as handle:
            column = pq.ParquetFile(handle).read(columns=["camera_id"])["camera_id"]
        cameras.update(str(c) for c in pc.unique(column).to_pylist())
    return sorted(cameras)


def check_files(files: Sequence[str]) -> None:
    """Fails fast, on the driver, when a file lacks the columns matching needs."""
    for path in files:
        with FileSystems.open(path) as handle:
            schema = pq.read_schema(handle)
        missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
        if missing:
            raise DetectionsSchemaError("%s lacks column(s) %s" % (path, ", ".join(missing)))


class ReadDetections(beam.PTransform):
    """Parquet files -> detection dicts timestamped with their capture time."""

    def __init__(self, files: Sequence[str], timezone: str = "UTC", batch_rows: int = 4096):
        super().__init__()
        self._files = list(files)
        self._timezone = timezone
        self._batch_rows = batch_rows

    def expand(self, pbegin):
        return (
            pbegin
            | "Files" >> beam.Create(self._files)
            | "Spread" >> beam.Reshuffle()
            | "ReadParquet" >> beam.ParDo(_ReadFileFn(self._timezone, self._batch_rows))
        )
