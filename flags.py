"""
argparse types shared by the scripts: bounded numbers, names of environment variables that hold keys.

    from flags import POS_INT, key_env, number
    p.add_argument("--concurrency", type=POS_INT, default=8)
    p.add_argument("--top-p", type=number(float, above=0, high=1), default=1.0)
    p.add_argument("--api-key-env", type=key_env, default="OPENAI_API_KEY")

A bad value stops the script at parse time with argparse's usage line and exit status 2:
"argument --top-p: 0 is out of range (must be > 0 and <= 1)".
"""

import argparse
import math
import re


def number(kind, low=None, above=None, high=None):
    """An argparse type: an int or float within bounds (>= low, > above, <= high), else argparse's error."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(v) or (low is not None and v < low) or (above is not None and v <= above) or \
                (high is not None and v > high):
            bounds = [f">= {low}" if low is not None else "", f"> {above}" if above is not None else "",
                      f"<= {high}" if high is not None else ""]
            raise argparse.ArgumentTypeError(f"{text} is out of range (must be {' and '.join(b for b in bounds if b)})")
        return v
    return parse


POS_INT, NONNEG_INT, POS, NONNEG = number(int, low=1), number(int, low=0), number(float, above=0), number(float, low=0)
FRACTION = number(float, low=0, high=1)


def key_env_problem(name):
    """Why `name` cannot be the name of the environment variable that holds a key, or None. The value
    is never shown: it is most likely a key pasted in the wrong place, bound for a terminal or a log."""
    mixed_case = re.search("[a-z]", name) and re.search("[A-Z]", name)       # base62 keys
    hex_like = len(name) >= 20 and "_" not in name and re.search("[0-9]", name)  # hex keys
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", name) and not mixed_case and not hex_like:
        return None
    return ("takes the NAME of an environment variable, such as OPENAI_API_KEY; the value given is not one "
            "(not shown: it may be a key)")


def key_env(text):
    """An argparse type for a flag that names the environment variable holding a key."""
    if (problem := key_env_problem(text)):
        raise argparse.ArgumentTypeError(problem)
    return text
