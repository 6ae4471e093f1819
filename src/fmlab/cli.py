"""How the entry points (train.py, eval.py, export.py, generate.py) report a failure.

A user error (a bad option or override, a missing or malformed file, incompatible choices: `UserError`, Hydra's
composition errors, OmegaConf's config errors) prints one line, `error: <option or file>: <what is wrong and what
to do>`, and exits with status 2; its traceback goes to the run's log file only. An internal error keeps its
traceback. `HYDRA_FULL_ERROR=1` (or `FMLAB_DEBUG=1`) shows every traceback as Python would.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from fmlab.errors import UserError

USER_ERROR_STATUS = 2
PACKAGE = Path(__file__).resolve().parent
HYDRA = Path(hydra.__file__).resolve().parent
# Hydra adds these paragraphs to its messages; the one-line form leaves them out.
NOISE = ("Set the environment variable HYDRA_FULL_ERROR", "Config search path:", "full_key:", "object_type=")


def debugging() -> bool:
    return any(os.environ.get(name, "") not in ("", "0") for name in ("HYDRA_FULL_ERROR", "FMLAB_DEBUG"))


def is_user_error(err: BaseException) -> bool:
    """Bad input rather than a bug: ours, Hydra's composition and instantiation errors, OmegaConf's, or a file
    Hydra could not write for the run folder."""
    if isinstance(err, UserError | OmegaConfBaseException | HydraException):
        return True
    return isinstance(err, OSError) and raised_by_hydra(err)


def raised_by_hydra(err: BaseException) -> bool:
    """Raised while Hydra set the job up (its run folder, config copy, log file), before any fmlab code ran."""
    files = [Path(frame.filename).resolve() for frame in traceback.extract_tb(err.__traceback__)]
    ours = [f for f in files if f.is_relative_to(PACKAGE) and f != Path(__file__).resolve()]
    return any(f.is_relative_to(HYDRA) for f in files) and not ours


def root_cause(err: BaseException) -> BaseException:
    """Our own error inside a chain, where Hydra's instantiate or OmegaConf's resolver wrapped it (its message is
    the specific one); else `err` itself."""
    seen, inner = set(), err
    while inner is not None and id(inner) not in seen:
        if isinstance(inner, UserError):
            return inner
        seen.add(id(inner))
        inner = inner.__cause__ or inner.__context__
    return err


def one_line(err: BaseException) -> str:
    """`err` as a single line: its message lines joined, Hydra's boilerplate left out."""
    err = root_cause(err)
    if isinstance(err, OSError) and not isinstance(err, UserError | HydraException):
        return (f"{err.filename}: cannot write the run folder ({err.strerror}); choose a writable "
                "hydra.run.dir or paths.log_dir")
    text = str(err) or type(err).__name__
    key = getattr(err, "full_key", None)
    if isinstance(err, OmegaConfBaseException) and key and not text.startswith(key):
        hint = "; set it on the command line" if "Missing mandatory" in text else ""
        text = f"{key}: {text.splitlines()[0]}{hint}"
    override = re.match(r"Could not override '([^']+)'", text)
    parts: list[str] = [f"{override.group(1)}: no such option"] if override else []
    listing: list[str] | None = None  # the items after a line ending in ':' (Hydra's available options)
    for line in text.splitlines()[1 if override else 0:]:
        line = line.strip()
        if line.startswith("Config search path:"):
            break
        if not line or any(line.startswith(noise) for noise in NOISE):
            continue
        if line.endswith(":"):
            listing = []
            parts.append(line[0].lower() + line[1:-1] + ": ")
        elif listing is not None:
            listing.append(line)
            parts[-1] = parts[-1].split(": ")[0] + ": " + ", ".join(listing)
        else:
            parts.append(line.rstrip("."))
    return "; ".join(parts)


def log_to_file(message: str, err: BaseException) -> None:
    """Write `err`'s traceback to the run's log file handlers only (the console shows one line)."""
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    record = logging.LogRecord(__name__, logging.ERROR, __file__, 0, message, None,
                               (type(err), err, err.__traceback__))
    for handler in handlers:
        handler.handle(record)


class QuietHydra:
    """stderr without the line Hydra writes before re-raising a job's error (the one-line form replaces it)."""

    PREFIX = "Error executing job with overrides"

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        return len(text) if text.startswith(self.PREFIX) else self.stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def run(main: Callable[[], Any]) -> None:
    """Call a `@hydra.main` function, turning user errors into one line and exit status 2."""
    if debugging():
        main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing; the message is formatted here
    stderr = sys.stderr
    sys.stderr = QuietHydra(stderr)
    try:
        main()
    except Exception as err:  # noqa: BLE001 - sorted below: user errors one line, the rest as Python prints them
        if not is_user_error(err):
            raise
        print(f"error: {one_line(err)}", file=stderr, flush=True)
        sys.exit(USER_ERROR_STATUS)
    finally:
        sys.stderr = stderr
        os.environ.pop("HYDRA_FULL_ERROR", None)
