"""`cctview demo`, the README's first command: end to end on a small world, offline."""
import re

from pipelines.cli import main


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--minutes", "3"]) == 0
    printed = capsys.readouterr().out
    scores = dict(re.findall(r"^  (mutual NN, no links|links \+ mutual NN|links \+ learned)"
                             r"\s+(\d+) matches", printed, re.M))
    assert set(scores) == {"mutual NN, no links", "links + mutual NN", "links + learned"}
    assert int(scores["mutual NN, no links"]) > 0
    assert int(scores["links + mutual NN"]) > 0
    if int(scores["links + learned"]) == 0:
        assert "the learned matcher abstained" in printed
    assert "Links found" in printed
    html = (out / "report" / "index.html").read_text()
    assert "<img" in html or "<table" in html
    for folder in ("run/detections", "run/matches", "linked", "linked-mutual/matches"):
        assert (out / folder).is_dir(), folder
