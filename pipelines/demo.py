"""cctview demo: the embedded default, offline and end to end, scored against the truth.

1. ``synth``: a synthetic road with cameras, vehicles in both directions, lighting
   changes and occlusions, with ground truth;
2. ``run``: frames -> detections (``background`` detector, ``color_bands`` embedder:
   colour histograms of horizontal strips, no weights) and matches by CCTView's idea (mutual nearest neighbours within
   ``--max-gap``);
3. ``calibrate``: camera links from the stored detections (no model runs again);
4. ``match --links``: matches re-computed from the stored embeddings with the links,
   once with mutual nearest neighbours inside the links' bands and once with the
   default learned matcher on power-normalised, camera-centred embeddings (which
   abstains where the footage is too short for it to reach its precision target, and
   says so per camera pair);
5. ``report``: a static HTML page of the linked matches (the learned ones when it
   matched, else the mutual ones).

At the end it prints, per matching, pair precision and transit recall against the
ground truth, and the links found next to the true ones.
"""
import argparse
import json
import time

from pipelines import commands, ground_truth, report, synth
from pipelines.command import Command, parse

__all__ = ["COMMAND", "add_arguments", "run_from_args"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="out/demo",
                        help="folder for the world, the run, links.json and the report "
                             "(default out/demo)")
    parser.add_argument("--cameras", type=int, default=3, help="cameras (default 3)")
    parser.add_argument("--minutes", type=float, default=16.0,
                        help="minutes of footage (default 16: the learned matcher's "
                             "time-shifted controls need a period several times the "
                             "links' bands)")
    parser.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    parser.add_argument("--noise", type=float, default=1.0, help="world noise (default 1)")
    parser.add_argument("--max-gap", type=float, default=120.0, dest="max_gap",
                        help="largest |dt| in seconds for matching and calibration "
                             "(default 120)")


def _step(title: str, argv) -> None:
    """Runs one command (``argv[0]``: its name, then its flags) as the CLI would."""
    name, flags = argv[0], argv[1:]
    command = _STEPS[name]
    started = time.time()
    print("== %s" % title, flush=True)
    code = command.run(parse(name, command, flags))
    if code != 0:
        raise SystemExit(code)
    print("   (%.1f s)" % (time.time() - started), flush=True)


def _truth(run_dir, world, max_gap_s):
    """(detection -> vehicle ids, true transits) of a run on the synthetic world."""
    truth = ground_truth.load_truth(world)
    detections = ground_truth.read_table(run_dir + "/detections")
    return (ground_truth.vehicle_of_detections(detections, truth),
            ground_truth.true_transits(truth, max_gap_s))


def run_from_args(args: argparse.Namespace) -> int:
    out = args.output.rstrip("/")
    world, run_dir, linked = out + "/world", out + "/run", out + "/linked"
    gap = ["--max-gap", str(args.max_gap)]
    started = time.time()
    _step("synth: %d cameras, %g minutes" % (args.cameras, args.minutes),
          ["synth", "--output", world, "--cameras", str(args.cameras),
           "--minutes", str(args.minutes), "--seed", str(args.seed),
           "--noise", str(args.noise)])
    _step("run: background detector + strip colour histograms, mutual nearest neighbours",
          ["run", "--input", world + "/frames", "--output", run_dir,
           "--detector", "background", "--embedder", "color_bands"] + gap)
    vehicles, transits = _truth(run_dir, world, args.max_gap)
    unlinked = ground_truth.score_matches(
        ground_truth.read_table(run_dir + "/matches"), vehicles, transits)
    _step("calibrate: camera links from the stored detections",
          ["calibrate", "--detections", run_dir + "/detections",
           "--output", linked + "/links.json"] + gap)
    linked_mutual = out + "/linked-mutual"
    _step("match --links --policy mutual: re-matched from stored embeddings",
          ["match", "--detections", run_dir + "/detections", "--links",
           linked + "/links.json", "--policy", "mutual", "--output", linked_mutual])
    _step("match --links: the learned default, from the same embeddings (strip colour "
          "histograms: square roots, camera mean removed)",
          ["match", "--detections", run_dir + "/detections", "--links",
           linked + "/links.json", "--embedding-norm", "power+center", "--output", linked])
    with_mutual = ground_truth.score_matches(
        ground_truth.read_table(linked_mutual + "/matches"), vehicles, transits)
    learned = ground_truth.score_matches(
        ground_truth.read_table(linked + "/matches"), vehicles, transits)
    shown = linked if learned["matches"] else linked_mutual
    _step("report", ["report", "--input", shown, "--detections", run_dir + "/detections",
                     "--output", out + "/report"])
    print("\nAgainst the ground truth (pairs: precision; transits: recall):")
    for name, s in (("mutual NN, no links", unlinked), ("links + mutual NN", with_mutual),
                    ("links + learned", learned)):
        print("  %-20s %5d matches, precision %.2f, recall %.2f (%d of %d transits)" % (
            name, s["matches"], s["precision"], s["recall"], s["transits_found"],
            s["transits"]))
    if not learned["matches"]:
        print("  (the learned matcher abstained on every linked camera pair: the lines "
              "after its step say what each pair reached and which --min-precision would "
              "return matches; %g minutes are few pairs to learn from, try more --minutes)"
              % args.minutes)
    with open(world + "/ground_truth/links.json") as handle:
        true_links = json.load(handle)
    with open(linked + "/links.json") as handle:
        found_links = json.load(handle)
    print("Links found (true offsets in brackets):")
    for link in found_links:
        truth_offsets = [t["offset_s"] for t in true_links
                         if (t["camera_a"], t["camera_b"]) == (link["camera_a"], link["camera_b"])]
        print("  %s -> %s: %+.1f s +- %.1f [%s]" % (
            link["camera_a"], link["camera_b"], link["offset_s"], link["spread_s"],
            ", ".join("%+.1f" % o for o in sorted(truth_offsets))))
    print("\ndemo done in %.0f s: report at %s/report/index.html" % (time.time() - started, out))
    return 0


# The commands the demo's steps run, by the names its argv lists give them.
_STEPS = {"synth": synth.COMMAND, "run": commands.RUN, "calibrate": commands.CALIBRATE,
          "match": commands.MATCH, "report": report.COMMAND}

COMMAND = Command(
    "the embedded default: synth, run, calibrate, match --links, report; offline, "
    "scored against the ground truth",
    (), run_from_args, add_arguments=add_arguments)
