"""Shared test helper: a bad input must end as one 'error: ...' line on stderr and exit code 2."""
import pytest


def one_line_error(capsys, fn, *args):
    with pytest.raises(SystemExit) as e:
        fn(*args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err
