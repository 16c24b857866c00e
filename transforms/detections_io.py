"""ReadDetections: stored detections Parquet (ours, CCTView's, anyone's) -> detection dicts.

This is what lets matching be re-run without touching frames or models: any Parquet
with ``camera_id``, ``frame_ts`` (timestamp; naive = ``timezone``), ``detection_id``
and ``embedding`` (list or fixed_size_list of float16/float32) is accepted; ``label``,
``score``, ``box_xyxy``, ``frame_uri`` are carried along when present.

Column chunks for matching (``as_columns``) leave the embeddings where they are when a
row group's metadata proves every row has one (no null in the column's statistics, as
many values as rows times a size): the chunk then carries :class:`StoredRows` (path, row
group, row numbers) and matching reads the vectors in the block that computes them
(:func:`load_stored_rows`), so they never cross a shuffle.
"""
from typing import List, NamedTuple, Sequence, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import TimestampedValue
from transforms import progress
from transforms.match_blocks.wire import StoredRows

__all__ = ["DetectionColumns", "DetectionsSchemaError", "FileSpan", "NAMESPACE",
           "OPTIONAL_COLUMNS", "REQUIRED_COLUMNS", "ReadDetections", "inspect_files",
           "load_stored_rows", "parquet_files", "row_group_spans", "table_to_columns",
           "table_to_detections"]

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
    if pa.types.is_fixed_size_list(column.type):
        size = column.type.list_size
        values = column.values.slice(column.offset * size, len(column) * size)
    else:
        offsets = column.offsets
        first = offsets[0].as_py() if len(offsets) else 0
        values = column.values.slice(first, (offsets[-1].as_py() - first) if len(offsets) else 0)
    # The child array as it is (``flatten`` copies it through a slow path: ~1 s per 16k
    # rows of 1920 float16 values, more than decoding them).
    flat = values.to_numpy(zero_copy_only=False)
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
    with no Python object per detection. ``embedding`` is (n, D), float16 when stored so,
    or :class:`StoredRows`: where they are stored (:func:`load_stored_rows` reads them)."""
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
    if table["embedding"].null_count == 0:
        return table  # filtering would copy every embedding
    return table.filter(pc.is_valid(table["embedding"]))


def table_to_columns(table: pa.Table, timezone: str = "UTC") -> DetectionColumns:
    """One table of stored detections -> :class:`DetectionColumns` (rows without an
    embedding dropped, as :func:`table_to_detections` drops them)."""
    return _columns(_valid_rows(table), timezone)


def _columns(table: pa.Table, timezone: str, embedding=None) -> DetectionColumns:
    """:func:`table_to_columns` for a table already through :func:`_valid_rows`;
    ``embedding``: what stands for the table's embeddings (its column is then not read)."""
    return DetectionColumns(
        np.asarray(table["camera_id"].cast(pa.string()).to_numpy(zero_copy_only=False), dtype=str),
        _epoch_ms(table["frame_ts"], timezone),
        np.asarray(table["detection_id"].cast(pa.string()).to_numpy(zero_copy_only=False), dtype=str),
        _embedding_matrix(table["embedding"]) if embedding is None else embedding)


def table_to_detections(table: pa.Table, timezone: str = "UTC") -> List[dict]:
    """Normalises one table of stored detections into detection dicts."""
    return _detections(_valid_rows(table), timezone)


def _detections(table: pa.Table, timezone: str) -> List[dict]:
    """:func:`table_to_detections` for a table already through :func:`_valid_rows`."""
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


def _row_groups_in(parquet: pq.ParquetFile, time_range, timezone: str) -> list:
    """The row groups of ``parquet`` whose ``frame_ts`` statistics may hold a time of
    ``time_range`` (all of them where a group has no statistics)."""
    groups = list(range(parquet.metadata.num_row_groups))
    if time_range is None:
        return groups
    spans = row_group_spans(parquet, timezone)
    return [g for g, span in zip(groups, spans)
            if span is None or (span[1] >= time_range[0] and span[0] < time_range[1])]


class _ReadFileFn(beam.DoFn):
    def __init__(self, timezone: str, batch_rows: int, as_columns: bool, time_range,
                 cameras=None):
        self._timezone = timezone
        self._batch_rows = batch_rows
        self._as_columns = as_columns
        self._time_range = time_range
        self._cameras = cameras
        self.rows = progress.counter(NAMESPACE, "detections_read")

    def process(self, path):
        with FileSystems.open(path) as handle:
            parquet = pq.ParquetFile(handle)
            names = REQUIRED_COLUMNS if self._as_columns else REQUIRED_COLUMNS + OPTIONAL_COLUMNS
            columns = [c for c in names if c in parquet.schema_arrow.names]
            groups = _row_groups_in(parquet, self._time_range, self._timezone)
            complete = all(c in parquet.schema_arrow.names for c in REQUIRED_COLUMNS)
            stored = [g for g in groups
                      if self._as_columns and complete and _all_embedded(parquet, g)]
            for g in stored:
                read = self._guarded(path, self._references, parquet, path, g)
                self.rows.inc(len(read))
                if len(read):
                    yield read
            rest = [g for g in groups if g not in stored]
            if not rest:
                return
            for batch in parquet.iter_batches(batch_size=self._batch_rows, columns=columns,
                                              row_groups=rest):
                read = self._guarded(path, self._convert, pa.Table.from_batches([batch]))
                self.rows.inc(len(read))
                if not self._as_columns:
                    for row in read:
                        yield TimestampedValue(row, row["frame_ts_ms"] / 1000.0)
                elif len(read):
                    yield read

    @staticmethod
    def _guarded(path: str, convert, *args):
        try:
            return convert(*args)
        except DetectionsSchemaError as exc:
            raise DetectionsSchemaError("%s: %s" % (path, exc)) from exc

    def _references(self, parquet: pq.ParquetFile, path: str, group: int) -> DetectionColumns:
        """Row group ``group`` as columns whose embeddings are :class:`StoredRows` (only
        the rows of the time range and cameras asked for; the embeddings are not read)."""
        table = parquet.read_row_group(group, columns=["camera_id", "frame_ts", "detection_id"])
        keep = self._wanted(table)
        if keep is None:
            rows = np.arange(table.num_rows)
        else:
            rows, table = np.flatnonzero(keep), table.filter(pa.array(keep))
        return _columns(table, self._timezone, StoredRows(path, group, rows))

    def _wanted(self, table: pa.Table):
        """The rows of the cameras and time range asked for, as a bool mask; None: all."""
        keep = None
        if self._cameras is not None:
            wanted = pc.is_in(table["camera_id"].cast(pa.string()),
                              value_set=pa.array(self._cameras, pa.string()))
            if not pc.all(wanted).as_py():
                keep = wanted.to_numpy(zero_copy_only=False)
        if self._time_range is not None:
            ts = _epoch_ms(table["frame_ts"], self._timezone)
            inside = (ts >= self._time_range[0]) & (ts < self._time_range[1])
            if not inside.all():
                keep = inside if keep is None else keep & inside
        return keep

    def _convert(self, table: pa.Table):
        """A record batch -> columns or dicts, only the rows of the time range (and of
        the cameras asked for)."""
        table = _valid_rows(table)
        keep = self._wanted(table)
        if keep is not None:  # a file of the cameras and range only is not copied
            table = table.filter(pa.array(keep))
        if self._as_columns:
            return _columns(table, self._timezone)
        return _detections(table, self._timezone)


def _all_embedded(parquet: pq.ParquetFile, group: int) -> bool:
    """Whether the metadata proves every row of ``group`` has an embedding, all of one
    size: no null among the values (lists, elements) and rows x size values. (Unequal
    sizes adding up to that are caught where the vectors are read.)"""
    meta = parquet.metadata.row_group(group)
    for i in range(meta.num_columns):
        column = meta.column(i)
        if column.path_in_schema.split(".")[0] == "embedding":
            stats = column.statistics
            return bool(meta.num_rows and stats is not None and stats.has_null_count
                        and stats.null_count == 0 and column.num_values
                        and column.num_values % meta.num_rows == 0)
    return False


def load_stored_rows(refs: Sequence[StoredRows]) -> Tuple[List[np.ndarray], int]:
    """The embeddings that ``refs`` point to, one (n, D) array each (float16 when stored
    so), and how many stored rows were decoded for them. Each (file, row group) is
    decoded once per call and released before the next: memory is the result plus one
    row group."""
    out: List[np.ndarray] = [None] * len(refs)
    by_path: dict = {}  # path -> row group -> positions in refs
    for i, ref in enumerate(refs):
        by_path.setdefault(ref.path, {}).setdefault(ref.row_group, []).append(i)
    decoded = 0
    for path, groups in sorted(by_path.items()):
        with FileSystems.open(path) as handle:
            parquet = pq.ParquetFile(handle)
            for group, indices in sorted(groups.items()):
                column = parquet.read_row_group(group, columns=["embedding"])["embedding"]
                try:
                    matrix = _embedding_matrix(column)
                except DetectionsSchemaError as exc:
                    raise DetectionsSchemaError("%s: %s" % (path, exc)) from exc
                decoded += len(matrix)
                for i in indices:
                    out[i] = matrix[refs[i].rows]
    return out, decoded


def row_group_spans(parquet: pq.ParquetFile, timezone: str) -> list:
    """``[(first ms, last ms) or None]`` per row group, from the ``frame_ts`` column's
    statistics (None where a group has none): no data is read."""
    index = parquet.schema_arrow.get_field_index("frame_ts")
    field = parquet.schema_arrow.field(index)
    if index < 0 or not pa.types.is_timestamp(field.type):
        return [None] * parquet.metadata.num_row_groups
    spans = []
    for g in range(parquet.metadata.num_row_groups):
        stats = parquet.metadata.row_group(g).column(index).statistics
        if stats is None or not stats.has_min_max:
            spans.append(None)
            continue
        bounds = pa.chunked_array([pa.array([stats.min, stats.max], type=field.type)])
        lo, hi = _epoch_ms(bounds, timezone).tolist()
        spans.append((int(lo), int(hi)))
    return spans


class FileSpan(NamedTuple):
    """What the driver knows of a detections file without reading its embeddings: its
    path, per row group (rows, first ms, last ms), the embedding size (0 if unknown),
    and its camera ids when asked for."""
    path: str
    groups: list
    dim: int = 0
    cameras: tuple = ()

    @property
    def rows(self) -> int:
        return sum(g[0] for g in self.groups)


def inspect_files(files: Sequence[str], timezone: str = "UTC",
                  cameras: bool = False) -> List[FileSpan]:
    """Fails fast, on the driver, when a file lacks the columns matching needs; returns
    each file's :class:`FileSpan` (row counts and time spans per row group, from the
    metadata; a group without statistics has its ``frame_ts`` column read; with
    ``cameras``, the distinct camera ids, reading only that column). Each file is
    opened once (thousands of files on gs:// are as many requests)."""
    found = []
    for path in files:
        with FileSystems.open(path) as handle:
            parquet = pq.ParquetFile(handle)
            missing = [c for c in REQUIRED_COLUMNS if c not in parquet.schema_arrow.names]
            if missing:
                raise DetectionsSchemaError("%s lacks column(s) %s" % (path, ", ".join(missing)))
            groups = []
            for g, span in enumerate(row_group_spans(parquet, timezone)):
                if span is None:
                    ts = _epoch_ms(parquet.read_row_group(g, columns=["frame_ts"])["frame_ts"],
                                   timezone)
                    span = (int(ts.min()), int(ts.max())) if len(ts) else (0, 0)
                groups.append((parquet.metadata.row_group(g).num_rows,) + tuple(span))
            ids = ()
            if cameras:
                column = parquet.read(columns=["camera_id"])["camera_id"]
                ids = tuple(sorted(str(c) for c in pc.unique(column).to_pylist()))
            found.append(FileSpan(path, groups, _embedding_dim(parquet.schema_arrow), ids))
    return found


def _embedding_dim(schema: pa.Schema) -> int:
    """The fixed embedding size of a fixed_size_list column; 0 for variable lists."""
    field = schema.field("embedding")
    return field.type.list_size if pa.types.is_fixed_size_list(field.type) else 0


class ReadDetections(beam.PTransform):
    """Parquet files -> detection dicts timestamped with their capture time, or, with
    ``as_columns``, :class:`DetectionColumns` chunks of up to ``batch_rows`` detections
    (the required columns only: for :class:`transforms.matching.MatchDetections`, which
    then never builds a Python object per detection).

    ``time_range=(lo, hi)`` (UTC epoch ms) keeps only the detections with
    ``lo <= frame_ts < hi``; row groups whose statistics lie outside are not read.
    ``cameras``: only the detections of these camera ids."""

    def __init__(self, files: Sequence[str], timezone: str = "UTC", batch_rows: int = 4096,
                 as_columns: bool = False, time_range=None, cameras=None):
        super().__init__()
        self._cameras = None if cameras is None else sorted(set(map(str, cameras)))
        self._files = list(files)
        self._timezone = timezone
        self._batch_rows = batch_rows
        self._as_columns = as_columns
        self._time_range = None if time_range is None else (int(time_range[0]),
                                                            int(time_range[1]))

    def expand(self, pbegin):
        return (
            pbegin
            | "Files" >> beam.Create(self._files)
            | "Spread" >> beam.Reshuffle()
            | "ReadParquet" >> beam.ParDo(
                _ReadFileFn(self._timezone, self._batch_rows, self._as_columns,
                            self._time_range, self._cameras))
        )
