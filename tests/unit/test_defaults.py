"""The CLI's defaults are the library's: a flag left out means what the transform's own
default means (``--window`` once was 600 s in the CLI and 60 s in MatchDetections, and
``assignment`` results depend on it)."""
import inspect

from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.options import (EMBEDDING_NORMS, POLICY_CHOICES, CalibrateOptions,
                               CandidateOptions, MatchOptions)
from pipelines.stages import policy_of
from transforms import learned_matching
from transforms.calibration import CalibrationPairs, find_links, links_of_pairs
from transforms.match_blocks import METRICS, POLICIES
from transforms.matching import MatchDetections


def _default(function, parameter: str):
    return inspect.signature(function).parameters[parameter].default


def _cli(group):
    return PipelineOptions([]).view_as(group)


def test_candidate_flags_default_to_the_matchers_defaults():
    flags = _cli(CandidateOptions)
    for function in (MatchDetections, CalibrationPairs):
        assert flags.max_gap == _default(function, "max_gap_s")
        assert flags.window == _default(function, "window_s")
        assert flags.metric == _default(function, "metric")


def test_match_flags_default_to_the_matchers_defaults():
    flags = _cli(MatchOptions)
    assert policy_of(PipelineOptions([])) == _default(MatchDetections, "policy")
    assert flags.top_k == _default(MatchDetections, "top_k")
    assert flags.threshold == _default(MatchDetections, "threshold")
    for function in (learned_matching.match_linked_pair, learned_matching.match_linked_periods,
                     learned_matching.LearnedLinkMatch):
        assert flags.min_precision == _default(function, "min_precision")
    for function in (learned_matching.match_linked_pair, learned_matching.LearnedLinkMatch):
        assert (flags.tracklets == "on") == _default(function, "tracklets")
        assert flags.selection == _default(function, "selection")
    selection = next(a for a in _actions(MatchOptions) if a.dest == "selection")
    assert tuple(selection.choices) == learned_matching.SELECTIONS


def test_calibrate_flags_default_to_the_link_finders_defaults():
    flags = _cli(CalibrateOptions)
    for function in (links_of_pairs, find_links):
        assert flags.min_support == _default(function, "min_support")
        assert flags.min_significance == _default(function, "min_significance")


def test_policy_metric_and_norm_choices_are_the_librarys():
    assert POLICY_CHOICES == POLICIES + (learned_matching.POLICY,)
    assert EMBEDDING_NORMS == ("none",) + learned_matching.NORMALIZATIONS[1:]
    metric = next(a for a in _actions(CandidateOptions) if a.dest == "metric")
    policy = next(a for a in _actions(MatchOptions) if a.dest == "policy")
    assert tuple(metric.choices) == METRICS and tuple(policy.choices) == POLICY_CHOICES


def _actions(group):
    import argparse

    parser = argparse.ArgumentParser()
    group._add_argparse_args(parser)
    return parser._actions
