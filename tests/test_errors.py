"""eval.errors: the one positive-count check and a command naming its flags."""

import numpy as np
import pytest

from eval.errors import UserInputError, naming_flags, require_positive


def test_require_positive_returns_counts_and_refuses_the_rest():
    assert require_positive("steps", 3) == 3 and require_positive("steps", np.int64(2)) == 2
    assert require_positive("recover_steps", 0, minimum=0) == 0
    for bad in (0, -1, 1.0, "2", True, None):
        with pytest.raises(UserInputError, match=r"^steps must be a positive integer, got ") as info:
            require_positive("steps", bad)
        assert info.value.field == "steps"
    with pytest.raises(UserInputError, match=r"^seq_len must be an integer >= 2, got 1$"):
        require_positive("seq_len", 1, minimum=2)


def test_naming_flags_names_the_commands_flag_only_for_its_settings():
    error = UserInputError("block_size must be a positive integer, got 0", field="block_size")
    assert str(naming_flags(error, {"block_size": 0})) == "--block-size must be a positive integer, got 0"
    assert str(naming_flags(error, {}, {"block_size": "--block"})).startswith("--block must")
    assert naming_flags(error, {"other": 1}) is error  # not one of the command's settings
    plain = UserInputError("no such file")
    assert naming_flags(plain, {"block_size": 0}) is plain
