"""``common.errors.shown``: the one way a message quotes a value from outside."""

from __future__ import annotations

import sys

import pytest

from common.errors import shown


def test_short_values_are_their_repr() -> None:
    assert shown("abc") == "'abc'"
    assert shown(3.5) == "3.5"
    assert shown([1, 2]) == "[1, 2]"


def test_a_long_string_keeps_head_and_tail_and_says_its_length() -> None:
    text = "H" + "x" * 10_000 + "T"
    out = shown(text, 40)
    assert len(out) < 70
    assert out.startswith("'Hxx") and "xT'" in out and "(10002 chars)" in out


def test_a_huge_container_is_never_rendered_in_full() -> None:
    out = shown(list(range(1_000_000)))
    assert len(out) < 80 and out.startswith("[0, 1, 2")
    nested = {"a": {"b": {"c": {"d": {"e": 1}}}}}
    assert "..." in shown(nested)


@pytest.mark.skipif(
    not hasattr(sys, "get_int_max_str_digits"), reason="no int digit limit"
)
def test_an_int_past_the_digit_limit_is_named_not_shown() -> None:
    big = 10 ** (sys.get_int_max_str_digits() + 10)
    assert shown(big) == "<int too long to show>"


def _raise_config_error() -> None:
    from common.errors import ConfigError

    raise ConfigError("mammofed-sim run --set", "trainer.options.x", "unknown key")


def test_errors_with_fields_survive_a_worker_process() -> None:
    """A study's seeds run in spawned processes: an error a worker raises must
    come back whole (message and fields), not as a broken pool."""
    import concurrent.futures as cf
    import multiprocessing as mp
    import pickle

    from common.errors import ConfigError, RefusedImage

    for exc in (
        ConfigError("f.yaml", "a.b", "must be >= 1"),
        RefusedImage("x.dcm", "no"),
    ):
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and str(back) == str(exc)
        assert vars(back) == vars(exc)
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        with pytest.raises(ConfigError, match=r"--set: trainer.options.x: unknown key"):
            pool.submit(_raise_config_error).result(timeout=120)
