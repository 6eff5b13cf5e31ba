"""The README's main command (the DeltaNet demo) runs and its decoding agrees with the full call."""

from seqmix import demo


def test_demo_runs(capsys):
    demo.main(["--hidden-size", "32", "--num-heads", "2", "--seqlen", "70", "--decode", "3"])
    out = capsys.readouterr().out
    assert "relative error vs one full call" in out
