"""Beam pipelines on a dask.distributed cluster: Beam's DaskRunner, translated afresh.

``--runner DaskRunner --dask_client_address tcp://HOST:PORT`` runs a command's pipeline
on the scheduler at that address (``dask scheduler`` + ``dask worker``, a
dask-kubernetes or dask-jobqueue cluster). The options are Beam's own
(``apache_beam.runners.dask.dask_runner.DaskOptions``) and so is the way the graph is
built (Beam's overrides for Create, GroupByKey, Flatten, Reshuffle), but the
translation of the graph into dask bags is this module's, because Beam 2.77's does
not run these pipelines correctly (each point measured with a five-line pipeline):

* it computes only the last transform applied, so of a pipeline with several sinks
  (detections, dead letters, matches) only the last one is written;
* it keeps one bag per *transform*, not per output: every consumer of a tagged
  output (``with_outputs``) receives all the DoFn's outputs, dead letters and
  detections mixed;
* it drops each element's timestamp and windows between steps (and treats
  ``WindowInto`` and ``GroupAlsoByWindow`` as no-ops), so windowed grouping, which the
  matcher's blocks use, groups everything together;
* it loses what a DoFn emits in ``finish_bundle`` (``BatchElements`` does: the last
  batch of every bundle, i.e. frames, would vanish);
* ``metrics()`` raises NotImplementedError.

Here every PCollection is a bag of WindowedValues; a ParDo runs Beam's own
``DoFnRunner`` over one bag partition per task (a bundle), with its side inputs as
task dependencies, and returns its outputs tagged plus the bundle's counters; each
output PCollection is the matching slice of that result; GroupByKey groups by the
key's deterministic encoding (a stable hash across processes, as Beam groups by
encoded keys); every PCollection that nothing consumes is computed, so every sink
runs. Counters come back with the task results: a task the scheduler re-runs after a
worker died counts once. A DoFn is unpickled and set up once per worker process and
job, and reused by that job's later bundles (RunInference then loads its model once
per process and job).

Not supported, refused with one line before anything runs: stateful DoFns and timers,
splittable DoFns, ``beam.io.Read`` sources and other primitives outside ParDo,
GroupByKey, Flatten, Create, Reshuffle and Impulse; ``--streaming``. Only counters are
collected (no distributions or gauges).
"""
import hashlib
import itertools
import threading
import uuid
from functools import partial
from typing import Dict, List, Optional

from apache_beam import coders, pvalue, typehints
from apache_beam.internal import pickler
from apache_beam.io.iobase import Read
from apache_beam.metrics.execution import MetricKey, MetricResult, MetricsContainer
from apache_beam.metrics.metric import MetricResults
from apache_beam.metrics.metricbase import MetricName
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.pipeline import PipelineVisitor
from apache_beam.runners.common import DoFnRunner, DoFnSignature, Receiver
from apache_beam.runners.dask.dask_runner import DaskOptions
from apache_beam.runners.dask.dask_runner import DaskRunner as BeamDaskRunner
from apache_beam.runners.dask.overrides import (_Create, _Flatten, _GroupByKeyOnly,
                                                _Reshuffle, dask_overrides)
from apache_beam.runners.runner import PipelineResult, PipelineState
from apache_beam.runners.worker import statesampler
from apache_beam.transforms import core
from apache_beam.transforms.sideinputs import SideInputMap
from apache_beam.transforms.userstate import is_stateful_dofn
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils.counters import CounterFactory

from runners.errors import JobFailed, UsageError

__all__ = ["DaskJobResult", "DaskRunner", "run_bundle"]

# The tag of a bundle's counters among its outputs (no PCollection has this tag).
_COUNTERS = "__cctview_dask_counters__"
# Partitions per worker thread when --dask_npartitions is not given: enough that two
# tasks per thread keep every worker busy while the slowest one finishes.
_PARTITIONS_PER_THREAD = 2


# ------------------------------------------------------------------ worker side
class _ListReceiver(Receiver):
    """Appends (tag, WindowedValue) to a bundle's output list."""

    def __init__(self, tag, out: list):
        self._tag, self._out = tag, out

    def receive(self, windowed_value):
        self._out.append((self._tag, windowed_value))


class _Receivers(dict):
    """tag -> receiver; outputs to undeclared tags are dropped, as Beam's runners do."""

    def __missing__(self, key):
        return _ListReceiver(None, [])


# Unpickled, set-up DoFns of this worker process that no bundle is using: job id ->
# payload digest -> DoFns. A later bundle of the same step of the same job reuses one
# (setup once per process, as on Beam's other runners; two bundles running at once in
# two threads get two). A DoFn is never reused by another job (its setup may have read
# files that changed since), and a new job's first bundle drops the older jobs' DoFns,
# so that a long-lived worker does not keep a model copy per past job.
_IDLE_FNS: Dict[str, Dict[str, list]] = {}
_IDLE_LOCK = threading.Lock()


def _take_fn(job: str, digest: str, payload: bytes):
    """-> ((DoFn, args, kwargs, windowing, views), needs_setup) for one bundle."""
    with _IDLE_LOCK:
        if job not in _IDLE_FNS:
            for old in [j for j in _IDLE_FNS if j != job]:
                for fns in _IDLE_FNS.pop(old).values():
                    for fn in fns:
                        _teardown(fn[0])
            _IDLE_FNS[job] = {}
        idle = _IDLE_FNS[job].get(digest)
        if idle:
            return idle.pop(), False
    return pickler.loads(payload), True


def _give_back_fn(job: str, digest: str, fn) -> None:
    with _IDLE_LOCK:
        if job in _IDLE_FNS:  # else a newer job has started here: drop this one
            _IDLE_FNS[job].setdefault(digest, []).append(fn)
            return
    _teardown(fn[0])


def _teardown(dofn) -> None:
    """DoFn.teardown, best effort (as Beam promises it): a failure is not the job's."""
    try:
        dofn.teardown()
    except Exception:  # pylint: disable=broad-except
        pass


def _counters_of(container: MetricsContainer) -> Dict[tuple, int]:
    return {(key.metric.namespace, key.metric.name): value
            for key, value in container.get_cumulative().counters.items()}


def run_bundle(items, step: dict, *side_values) -> list:
    """One ParDo over one partition: -> [(tag, WindowedValue)..., (_COUNTERS, counts)].

    ``step`` holds the job's id, the step's label, output tags and the digest and
    bytes of its pickled (DoFn, args, kwargs, input windowing, side-input views);
    ``side_values`` are the side inputs' WindowedValues, computed by the scheduler
    before this task.
    """
    fn, needs_setup = _take_fn(step["job"], step["digest"], step["fn"])
    dofn, args, kwargs, windowing, views = fn
    out: list = []
    receivers = _Receivers({tag: _ListReceiver(tag, out) for tag in step["tags"]})
    side_inputs = [SideInputMap(view_class, options, values)
                   for (view_class, options), values in zip(views, side_values)]
    runner = DoFnRunner(dofn, args, kwargs, side_inputs, windowing,
                        tagged_receivers=receivers, step_name=step["label"])
    sampler = statesampler.StateSampler("", CounterFactory())
    previous = statesampler.get_current_tracker()
    statesampler.set_current_tracker(sampler)
    container = MetricsContainer(step["label"])
    try:
        with sampler.scoped_state(step["label"], "process", metrics_container=container):
            if needs_setup:
                runner.setup()
            runner.start()
            for windowed_value in items:
                runner.process(windowed_value)
            runner.finish()
    except BaseException:
        _teardown(dofn)  # a DoFn that failed mid-bundle is not reused
        raise
    finally:
        statesampler.set_current_tracker(previous)
    _give_back_fn(step["job"], step["digest"], fn)  # only a DoFn that finished is reused
    out.append((_COUNTERS, _counters_of(container)))
    return out


def _outputs_tagged(part, tag) -> list:
    return [windowed_value for t, windowed_value in part if t == tag]


def _counters_only(part) -> list:
    return [counts for t, counts in part if t == _COUNTERS]


def _nothing(part) -> list:
    return []


def _concat(*parts) -> list:
    return list(itertools.chain.from_iterable(parts))


def _keyed_for_grouping(key_coder, windowed_value):
    """-> (stable 64-bit hash of the encoded key, encoded key, element)."""
    encoded = key_coder.encode(windowed_value.value[0])
    digest = hashlib.blake2b(encoded, digest_size=8).digest()
    return int.from_bytes(digest, "big"), encoded, windowed_value


def _hash_of(entry):
    return entry[0]


def _groups(bucket_groups) -> list:
    """(hash, entries) groups -> one (key, [reified values]) per encoded key, as
    Beam's GroupByKeyOnly emits them (in the global window)."""
    out = []
    for _, entries in bucket_groups:
        by_key: Dict[bytes, list] = {}
        for _, encoded, windowed_value in entries:
            by_key.setdefault(encoded, []).append(windowed_value)
        for members in by_key.values():
            key = members[0].value[0]
            out.append(GlobalWindows.windowed_value((key, [m.value[1] for m in members])))
    return out


# ------------------------------------------------------------------ driver side
def _unsupported(node, why: str):
    return UsageError("the DaskRunner cannot run step %r: %s (runners/README.md, Dask)"
                      % (node.full_label, why))


def _key_coder(node):
    """A deterministic coder for the keys of a GroupByKey's input."""
    element_type = node.inputs[0].element_type
    key_type = typehints.Any
    if element_type is not None:
        key_type, _ = typehints.trivial_inference.key_value_types(element_type)
    coder = coders.registry.get_coder(key_type)
    try:
        return coder.as_deterministic_coder(node.full_label)
    except ValueError:
        return coders.registry.get_coder(typehints.Any).as_deterministic_coder(
            node.full_label)


class _Translator(PipelineVisitor):
    """Beam graph -> dask bags, one bag of WindowedValues per PCollection."""

    def __init__(self, npartitions: int, partition_size: Optional[int]):
        self.job = uuid.uuid4().hex
        self.npartitions = npartitions
        self.partition_size = partition_size
        self.bags: Dict[pvalue.PCollection, object] = {}
        self.consumed = set()
        self.counters: List[object] = []

    def visit_transform(self, node) -> None:
        transform = node.transform
        inputs = [p for p in node.inputs if isinstance(p, pvalue.PCollection)]
        self.consumed.update(inputs)
        self.consumed.update(si.pvalue for si in node.side_inputs)
        bags = [self.bags[p] for p in inputs]
        if isinstance(transform, core.ParDo):
            self._pardo(node, bags[0])
            return
        if isinstance(transform, _Create):
            bag = self._create(transform.values)
        elif isinstance(transform, core.Impulse):
            bag = self._create([b""])
        elif isinstance(transform, _Reshuffle):
            bag = self._spread(bags[0])
        elif isinstance(transform, _Flatten):
            from dask import bag as db

            bag = db.concat(bags) if bags else self._create([])
        elif isinstance(transform, _GroupByKeyOnly):
            bag = self._group(node, bags[0])
        elif isinstance(transform, Read):
            raise _unsupported(node, "beam.io.Read sources are not translated")
        else:
            raise _unsupported(node, "%s is not a ParDo, GroupByKey, Flatten, Create, "
                                     "Reshuffle or Impulse" % type(transform).__name__)
        (output,) = node.outputs.values()
        self.bags[output] = bag

    def _create(self, values):
        from dask import bag as db

        elements = [GlobalWindows.windowed_value(v) for v in values]
        if self.partition_size:
            return db.from_sequence(elements, partition_size=self.partition_size)
        return db.from_sequence(elements, npartitions=max(1, min(len(elements),
                                                                 self.npartitions)))

    def _spread(self, bag):
        """At least ``npartitions`` partitions (a bag's partitions are split, not moved)."""
        if bag.npartitions >= self.npartitions:
            return bag
        return bag.repartition(npartitions=self.npartitions)

    def _group(self, node, bag):
        # dask's task shuffle makes as many partitions as it is given: spread first, or a
        # GroupByKey after a one-element Create would put every group in one task.
        coder = _key_coder(node)
        return (self._spread(bag).map(partial(_keyed_for_grouping, coder))
                .groupby(_hash_of).map_partitions(_groups))

    def _pardo(self, node, bag) -> None:
        import dask

        transform = node.transform
        fn = transform.fn
        if is_stateful_dofn(fn):
            raise _unsupported(node, "stateful DoFns and timers are not supported")
        if DoFnSignature(fn).is_splittable_dofn():
            raise _unsupported(node, "splittable DoFns are not supported")
        views = [(type(si), si._view_options()) for si in node.side_inputs]
        payload = pickler.dumps(
            (fn, transform.args, transform.kwargs, node.inputs[0].windowing, views))
        step = {
            "job": self.job,
            "label": node.full_label,
            "tags": list(node.outputs),
            "digest": hashlib.sha256(payload).hexdigest(),
            "fn": payload,
        }
        sides = [dask.delayed(_concat)(*self.bags[si.pvalue].to_delayed(optimize_graph=False))
                 for si in node.side_inputs]
        result = bag.map_partitions(run_bundle, step, *sides)
        for tag, output in node.outputs.items():
            self.bags[output] = result.map_partitions(_outputs_tagged, tag)
        self.counters.append(result.map_partitions(_counters_only))

    def sinks(self) -> list:
        """What to compute: every unconsumed PCollection (emptied) and the counters."""
        from dask import bag as db

        leaves = [bag.map_partitions(_nothing) for pcoll, bag in self.bags.items()
                  if pcoll not in self.consumed]
        return leaves + [db.concat(self.counters)] if self.counters else leaves


class _Counters(MetricResults):
    """The job's counters, summed over the bundles that succeeded."""

    def __init__(self, totals: Dict[tuple, int]):
        self._results = [
            MetricResult(MetricKey("", MetricName(namespace, name)), value, value)
            for (namespace, name), value in sorted(totals.items())]

    def query(self, filter=None):
        counters = [r for r in self._results if filter is None or self.matches(filter, r.key)]
        return {self.COUNTERS: counters, self.DISTRIBUTIONS: [], self.GAUGES: [],
                self.STRINGSETS: [], self.BOUNDED_TRIES: [], self.HISTOGRAMS: []}


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return "%s: %s" % (type(exc).__name__, lines[0]) if lines else type(exc).__name__


class DaskJobResult(PipelineResult):
    """A submitted job: waits for every sink, then holds the summed counters."""

    def __init__(self, client, futures, counts_future):
        super().__init__(PipelineState.RUNNING)
        self._client, self._futures, self._counts_future = client, futures, counts_future
        self._totals: Dict[tuple, int] = {}

    def wait_until_finish(self, duration=None):
        from dask import distributed

        if self._state != PipelineState.RUNNING:
            return self._state
        try:
            timeout = duration / 1000 if duration is not None else None
            for _ in distributed.as_completed(self._futures, timeout=timeout,
                                              with_results=True):
                pass  # results are empty lists, but gathering raises a task's error
            if self._counts_future is not None:
                for counts in self._counts_future.result():
                    for name, value in counts.items():
                        self._totals[name] = self._totals.get(name, 0) + value
            self._state = PipelineState.DONE
        except Exception as exc:  # a DoFn's error, a lost worker (KilledWorker), timeout
            self._state = PipelineState.FAILED
            raise JobFailed("dask job failed: %s" % _first_line(exc)) from exc
        finally:
            self._client.close()
        return self._state

    def cancel(self):
        self._client.cancel(self._futures)
        self._client.close()
        self._state = PipelineState.CANCELLED
        return self._state

    def metrics(self):
        return _Counters(self._totals)


def _connect(distributed, dask_options: dict):
    """A Client of the scheduler the options name; UsageError (one line) if unreachable."""
    where = dask_options.get("address") or dask_options.get("scheduler_file") or "a new LocalCluster"
    try:
        return distributed.Client(**dask_options)
    except (OSError, ValueError, TimeoutError) as exc:
        raise UsageError("cannot reach the dask scheduler at %s (%s)"
                         % (where, _first_line(exc))) from None


class DaskRunner(BeamDaskRunner):
    """Runs a batch pipeline on the dask.distributed scheduler named by the options."""

    def run_pipeline(self, pipeline, options):
        from dask import distributed

        if options.view_as(StandardOptions).streaming:
            raise UsageError("the DaskRunner runs batch pipelines only (--streaming given)")
        dask_options = options.view_as(DaskOptions).get_all_options(
            drop_default=True, current_only=True)
        bag_kwargs = DaskOptions._extract_bag_kwargs(dask_options)
        pipeline.replace_all(dask_overrides())
        client = _connect(distributed, dask_options)
        try:
            threads = sum(client.nthreads().values()) or 1
            translator = _Translator(
                bag_kwargs.get("npartitions") or _PARTITIONS_PER_THREAD * threads,
                bag_kwargs.get("partition_size"))
            pipeline.visit(translator)
            sinks = translator.sinks()
            futures = client.compute(sinks)
        except BaseException:
            client.close()
            raise
        counts = futures[-1] if translator.counters else None
        return DaskJobResult(client, futures, counts)
