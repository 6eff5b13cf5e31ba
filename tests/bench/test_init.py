"""The ``seqmix-bench`` entry point dispatches to the benchmarks."""

import pytest

from seqmix import bench


@pytest.mark.parametrize("argv", [[], ["nope"]])
def test_unknown_command_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2 and "usage: seqmix-bench" in capsys.readouterr().err


@pytest.mark.parametrize("command", bench.COMMANDS)
def test_commands_reach_their_parsers(command, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main([command, "--help"])
    assert e.value.code == 0 and f"seqmix-bench {command}" in capsys.readouterr().out
