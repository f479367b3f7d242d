"""Library messages in the command line's words.

The library names parameters in its messages between backticks, as Python callers write them: ``\\`max_samples\\```,
``\\`pool='words'\\```. The command line shows the flag of the running subcommand instead: ``--max-samples``,
``--pool words`` (a boolean ``\\`name=True\\``` becomes the bare flag). Names the subcommand has no flag for keep
their backticks.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_NAMED = re.compile(r"`([a-z][a-z0-9_]*)(?:=([^`]*))?`")


def as_flags(message: str, flags: Mapping[str, str]) -> str:
    """``message`` with every backticked parameter that ``flags`` (dest -> option string) knows replaced by its
    flag, and ``name=value`` by ``flag value``."""

    def swap(match: re.Match) -> str:
        name, value = match.group(1), match.group(2)
        flag = flags.get(name)
        if flag is None:
            return match.group(0)
        if value is None or value == "True":
            return flag
        return f"{flag} {value.strip(chr(39))}"

    return _NAMED.sub(swap, message)


__all__ = ["as_flags"]
