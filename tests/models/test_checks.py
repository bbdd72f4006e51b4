"""check_settings (models/checks.py): the first check that fails is raised, as the caller's error."""
import pytest

from models.checks import check_settings


class _Bad(ValueError):
    pass


def test_the_first_failed_check_is_raised_as_the_given_error():
    with pytest.raises(_Bad, match=r"^b=0: expected >= 1$"):
        check_settings(_Bad, [(True, "a fine"), (False, "b=0: expected >= 1"), (False, "c=-1: expected >= 0")])


def test_checks_that_all_hold_raise_nothing():
    check_settings(_Bad, [(True, "a"), (1 > 0, "b")])
    check_settings(_Bad, [])
