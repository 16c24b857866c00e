"""ReadDetections: stored detections Parquet (ours, CCTView's, anyone's) -> detection dicts.

This is what lets matching be re-run without touching frames or models: any Parquet
with ``camera_id``, ``frame_ts`` (timestamp; naive = ``timezone``), ``detection_id``
and ``embedding`` (list or fixed_size_list of float16/float32) is accepted; ``label``,
``score``, ``box_xyxy``, ``frame_uri`` are carried along when present.
"""
from typing import List, NamedTuple, Sequence

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


def _embedding_matrix(column: pa.ChunkedArray) -> np.ndarray:
    """A list column of equal-length vectors -> one (n, D) array (float16 kept)."""
    column = column.combine_chunks()
    if pa.types.is_fixed_size_list(column.type):
        return _flat_values(column).reshape(-1, column.type.list_size)
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        raise DetectionsSchemaError("embedding must be a list column, not %s" % column.type)
    lengths = np.diff(column.offsets.to_numpy())
    if len(lengths) and (lengths != lengths[0]).any():
        raise DetectionsSchemaError("embeddings of different lengths (%d to %d values)"
                                    % (lengths.min(), lengths.max()))
    flat = _flat_values(column)
    return flat.reshape(len(column), int(lengths[0]) if len(lengths) else 0)


class DetectionColumns(NamedTuple):
    """Many stored detections as arrays (one Parquet record batch): what matching needs,
    with no Python object per detection. ``embedding`` is (n, D), float16 when stored so."""
    camera_id: np.ndarray
    frame_ts_ms: np.ndarray
    detection_id: np.ndarray
    embedding: np.ndarray

    def __len__(self):
        return len(self.detection_id)


def _valid_rows(table: pa.Table) -> pa.Table:
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise DetectionsSchemaError("missing column(s) %s" % ", ".join(missing))
    return table.filter(pc.is_valid(table["embedding"]))


def table_to_columns(table: pa.Table, timezone: str = "UTC") -> DetectionColumns:
    """One table of stored detections -> :class:`DetectionColumns` (rows without an
    embedding dropped, as :func:`table_to_detections` drops them)."""
    return _columns(_valid_rows(table), timezone)


def _columns(table: pa.Table, timezone: str) -> DetectionColumns:
    """:func:`table_to_columns` for a table already through :func:`_valid_rows`."""
    return DetectionColumns(
        np.asarray(table["camera_id"].cast(pa.string()).to_numpy(zero_copy_only=False), dtype=str),
        _epoch_ms(table["frame_ts"], timezone),
        np.asarray(table["detection_id"].cast(pa.string()).to_numpy(zero_copy_only=False), dtype=str),
        _embedding_matrix(table["embedding"]))


def table_to_detections(table: pa.Table, timezone: str = "UTC") -> List[dict]:
    """Normalises one table of stored detections into detection dicts."""
    table = _valid_rows(table)
    columns = _columns(table, timezone)
    extra = {c: table[c].to_pylist() for c in OPTIONAL_COLUMNS if c in table.column_names}
    rows = []
    for i in range(table.num_rows):
        row = {"camera_id": str(columns.camera_id[i]), "frame_ts_ms": int(columns.frame_ts_ms[i]),
               "detection_id": str(columns.detection_id[i]), "embedding": columns.embedding[i]}
        for name, values in extra.items():
            row[name] = values[i]
        rows.append(row)
    return rows


class _ReadFileFn(beam.DoFn):
    def __init__(self, timezone: str, batch_rows: int, as_columns: bool):
        self._timezone = timezone
        self._batch_rows = batch_rows
        self._as_columns = as_columns
        self.rows = Metrics.counter(NAMESPACE, "detections_read")

    def process(self, path):
        with FileSystems.open(path) as handle:
            parquet = pq.ParquetFile(handle)
            names = REQUIRED_COLUMNS if self._as_columns else REQUIRED_COLUMNS + OPTIONAL_COLUMNS
            columns = [c for c in names if c in parquet.schema_arrow.names]
            for batch in parquet.iter_batches(batch_size=self._batch_rows, columns=columns):
                convert = table_to_columns if self._as_columns else table_to_detections
                try:
                    read = convert(pa.Table.from_batches([batch]), self._timezone)
                except DetectionsSchemaError as exc:
                    raise DetectionsSchemaError("%s: %s" % (path, exc)) from exc
                self.rows.inc(len(read))
                if not self._as_columns:
                    for row in read:
                        yield TimestampedValue(row, row["frame_ts_ms"] / 1000.0)
                elif len(read):
                    yield read


def inspect_files(files: Sequence[str], cameras: bool = False) -> List[str]:
    """Fails fast, on the driver, when a file lacks the columns matching needs; with
    ``cameras``, returns the distinct camera ids of all ``files`` (reading only that
    column). Each file is opened once (thousands of files on gs:// are as many requests)."""
    found = set()
    for path in files:
        with FileSystems.open(path) as handle:
            parquet = pq.ParquetFile(handle)
            missing = [c for c in REQUIRED_COLUMNS if c not in parquet.schema_arrow.names]
            if missing:
                raise DetectionsSchemaError("%s lacks column(s) %s" % (path, ", ".join(missing)))
            if cameras:
                column = parquet.read(columns=["camera_id"])["camera_id"]
                found.update(str(c) for c in pc.unique(column).to_pylist())
    return sorted(found)


class ReadDetections(beam.PTransform):
    """Parquet files -> detection dicts timestamped with their capture time, or, with
    ``as_columns``, :class:`DetectionColumns` chunks of up to ``batch_rows`` detections
    (the required columns only: for :class:`transforms.matching.MatchDetections`, which
    then never builds a Python object per detection)."""

    def __init__(self, files: Sequence[str], timezone: str = "UTC", batch_rows: int = 4096,
                 as_columns: bool = False):
        super().__init__()
        self._files = list(files)
        self._timezone = timezone
        self._batch_rows = batch_rows
        self._as_columns = as_columns

    def expand(self, pbegin):
        return (
            pbegin
            | "Files" >> beam.Create(self._files)
            | "Spread" >> beam.Reshuffle()
            | "ReadParquet" >> beam.ParDo(
                _ReadFileFn(self._timezone, self._batch_rows, self._as_columns))
        )
