"""`cctview demo`, the README's first command: end to end on a small world, offline."""
import re

from pipelines.cli import main


def test_demo_end_to_end(tmp_path, capsys, monkeypatch):
    """Run the README's way: a relative --output (relative frame URIs in the detections,
    absolute ones in the ground truth), so the scores must still meet the truth."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out" / "demo"
    assert main(["demo", "--output", "out/demo", "--minutes", "3"]) == 0
    printed = capsys.readouterr().out
    found = re.findall(r"^  (mutual NN, no links|links \+ mutual NN|links \+ learned)"
                       r"\s+(\d+) matches, precision ([\d.]+)", printed, re.M)
    scores = {name: n for name, n, _ in found}
    precision = {name: float(p) for name, _, p in found}
    assert precision["links + mutual NN"] > 0.1, printed
    assert set(scores) == {"mutual NN, no links", "links + mutual NN", "links + learned"}
    assert int(scores["mutual NN, no links"]) > 0
    assert int(scores["links + mutual NN"]) > 0
    if int(scores["links + learned"]) == 0:
        assert "the learned matcher abstained on every linked camera pair" in printed
    assert "Links found" in printed
    # the learned step's summary: every linked camera pair says what it got, or why not
    summary = re.findall(r"^(cam-\d+) / (cam-\d+): (\d+ matches, estimated precision|"
                         r"no matches: )", printed, re.M)
    assert summary, printed
    html = (out / "report" / "index.html").read_text()
    assert "<img" in html or "<table" in html
    assert "Estimated precision (target-decoy)" in html and "Dead letters" in html
    for folder in ("run/detections", "run/matches", "linked", "linked-mutual/matches"):
        assert (out / folder).is_dir(), folder
