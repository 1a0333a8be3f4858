"""The Lua scripts, one ``lua/<name>.lua`` file each, read once per process.

Each file starts with a header documenting its KEYS, ARGV and reply: the contract
between the Python that builds the arguments and the Lua that parses them. A line
``--#include <snippet>`` is replaced by ``lua/_<snippet>.lua`` (shared pieces such
as the server clock are written once).
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from typing import Any

from callbridge.store.connection import Redis

_INCLUDE = re.compile(r"^--#include (\w+)$", re.MULTILINE)


@functools.cache
def source(name: str) -> str:
    """The Lua source of script `name`, includes expanded."""
    text = resources.files(__package__).joinpath("lua").joinpath(f"{name}.lua").read_text()
    return _INCLUDE.sub(lambda m: source("_" + m.group(1)), text)


def register(redis: Redis, name: str) -> Any:
    """A redis-py Script for `name` (EVALSHA, loaded on first use, again after a restart)."""
    return redis.register_script(source(name))
