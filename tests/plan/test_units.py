"""Memory sizes on the command line: SI and binary units parse, anything else is refused with
the argument's name."""

from __future__ import annotations

import pytest

from moe_parallel.plan import format_bytes, parse_bytes


@pytest.mark.parametrize("text,expected", [
    ("80GB", 80 * 10**9), ("80 GiB", 80 * 2**30), ("81920MiB", 80 * 2**30),
    ("80gib", 80 * 2**30), (" 1.5 TB ", 15 * 10**11), ("512KiB", 2**19), ("4096B", 4096),
    (".5GiB", 2**29),
])
def test_sizes_parse(text, expected):
    assert parse_bytes(text, "--gpu-memory") == expected


@pytest.mark.parametrize("text", ["eighty", "80", "GB", "80 XB", "-1GB", "", "80 G B", "1e3GB"])
def test_unparsable_sizes_name_the_argument(text):
    with pytest.raises(ValueError, match=r"^--gpu-memory: cannot parse .* e\.g\. 80GB"):
        parse_bytes(text, "--gpu-memory")


def test_format_bytes():
    assert format_bytes(80 * 2**30) == "80.0"
    assert format_bytes(3 * 10**9, "GB", 2) == "3.00"
