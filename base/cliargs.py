"""Command-line helpers every layer's ``cli`` module shares (argparse only, nothing of ours)."""

from __future__ import annotations

import argparse
from typing import Any


def group_option(group: argparse.ArgumentParser, verbs: argparse._SubParsersAction, *flags: str,
                 **kwargs: Any) -> None:
    """Accept an option of a command group before and after its verb.

    ``segnode models --weights-dir W import X`` and ``segnode models import X
    --weights-dir W`` then mean the same.  Call it after the verbs are added.
    The verbs' copies default to :data:`argparse.SUPPRESS`, so a value given
    before the verb is not reset by the verb's parser.
    """
    group.add_argument(*flags, default=kwargs.pop("default", None), **kwargs)
    for verb in dict.fromkeys(verbs.choices.values()):  # aliases map to the same parser
        verb.add_argument(*flags, default=argparse.SUPPRESS, **kwargs)
