"""`cctview demo`, the README's first command: end to end with its defaults, offline."""
import re

from pipelines.cli import main


def test_demo_end_to_end(tmp_path, capsys, monkeypatch):
    """Run exactly the README's way: the defaults and a relative --output (relative frame
    URIs in the detections, absolute ones in the ground truth). The learned default
    must reach true precision 0.85 and transit recall 0.6 (issue 14)."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out" / "demo"
    assert main(["demo", "--output", "out/demo"]) == 0
    printed = capsys.readouterr().out
    found = re.findall(r"^  (mutual NN, no links|links \+ mutual NN|links \+ learned)"
                       r"\s+(\d+) matches, precision ([\d.]+), recall ([\d.]+) \((\d+) of (\d+)",
                       printed, re.M)
    scores = {name: (int(n), float(p), int(hit) / int(of)) for name, n, p, _, hit, of in found}
    assert set(scores) == {"mutual NN, no links", "links + mutual NN", "links + learned"}
    assert scores["mutual NN, no links"][0] > 0 and scores["links + mutual NN"][0] > 0
    _, precision, recall = scores["links + learned"]
    assert precision >= 0.85 and recall >= 0.6, printed
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
