"""What every command line shares (``python -m train``, ``train.evaluate``, ``train.bench``, ``train.aot``):
one line per user error, quiet logs, no TPU probe on a machine without a TPU.

``run(main)`` replaces ``absl.app.run(main)``:

  * A ValueError (a bad config field or flag value), a ``train.checkpoint.CheckpointError`` or an
    OSError (a missing file, a full disk: the file is named) prints one line ``error: <sentence>``
    on stderr and exits with status 1; so do errors in parsing the flags and the config file (an
    unknown ``--config.`` field, a value of the wrong type, a config file that does not exist).
    ``--debug`` shows the traceback instead. Other exceptions (bugs) keep their traceback. Nothing
    follows the line on stderr (see `fail`).
  * Python logging shows warnings and errors only, Orbax's errors only; ``--verbosity=0`` shows
    everything at INFO again.
  * When ``JAX_PLATFORMS`` is not set and the machine has no accelerator (no TPU chip on the PCI bus,
    no NVIDIA or AMD GPU device), JAX is told to use the CPU: otherwise an installed libtpu (the
    test extra brings it) probes for TPUs at start-up and prints ``E0000 ... INVALID_ARGUMENT``
    lines. A TPU or GPU host, or an explicit ``JAX_PLATFORMS``, is left to JAX's own choice.
"""
from __future__ import annotations

import glob
import logging as std_logging
import os
import re
import sys
from typing import Callable

from absl import app, flags, logging

from train import checkpoint
from train.checkpoint import CheckpointError

USER_ERRORS = (ValueError, CheckpointError, OSError)
_GOOGLE_PCI_VENDOR = "0x1ae0"
_GPU_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def _tpu_attached() -> bool:
    """True when a TPU chip may be attached (JAX's own PCI check; any Google PCI device where that
    check is not available), or the environment names a TPU."""
    if any(k in os.environ for k in ("JAX_FORCE_TPU_INIT", "TPU_NAME", "TPU_ACCELERATOR_TYPE")):
        return True
    try:
        from jax._src import hardware_utils
        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except (ImportError, AttributeError, OSError):
        for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
            try:
                if open(vendor).read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
            except OSError:
                continue
        return False


def cpu_only_platform() -> str | None:
    """'cpu' when JAX should not probe for accelerators (JAX_PLATFORMS unset, none attached), else None."""
    if "JAX_PLATFORMS" in os.environ or _tpu_attached() or any(os.path.exists(d) for d in _GPU_DEVICES):
        return None
    return "cpu"


def quiet_platforms() -> None:
    """Use the CPU without a TPU probe where ``cpu_only_platform`` says so (before any backend starts)."""
    if cpu_only_platform():
        import jax
        jax.config.update("jax_platforms", "cpu")


def message(error: BaseException) -> str:
    """One line for a user error: an OSError as 'strerror: filename', a config file that failed to load
    by its last line, anything else by its text with line breaks folded."""
    if isinstance(error, OSError) and error.strerror and error.filename:
        names = [str(error.filename)] + ([str(error.filename2)] if error.filename2 else [])
        text = f"{error.strerror}: {' -> '.join(names)}"
    else:
        text = str(error) or type(error).__name__
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if "Failed loading config file" in text:  # ml_collections' report lists each path it tried
            text = f"cannot load the --config file: {lines[-1]}"
        elif "Error whilst parsing config file" in text:  # its get_config raised; the text holds the trace
            text = f"the --config file's get_config() raised {lines[-1]} (--debug shows where)"
    return " ".join(text.split())


def _unknown_field(error: BaseException, argv) -> str | None:
    """'--config.train.stepz names no field of the config (did you mean "steps"?).' for ml_collections'
    error about an override of a field that does not exist; None for other errors."""
    inner = error.args[0] if error.args and isinstance(error.args[0], BaseException) else error
    raw = str(inner.args[0]) if inner.args else str(inner)
    lines = raw.splitlines()
    if not lines:
        return None
    key = lines[0].strip("'\" ")
    hint = re.search(r'Did you mean "(\w+)"', raw)
    flag = next((a.split("=", 1)[0] for a in argv[1:]
                 if a.startswith("-") and re.search(rf"\.{re.escape(key)}$", a.split("=", 1)[0])), None)
    if flag is None:
        return None
    return f"{flag} names no field of the config{f' (did you mean {hint.group(1)!r}?)' if hint else ''}."


def int_list(text: str, flag: str, parts: int = 1, minimum: int = 1) -> list:
    """A flag's comma-separated integers >= ``minimum`` ('1,2,4'), or with ``parts`` > 1 its 'AxB...' groups
    ('4x8192') as tuples; ValueError naming ``flag`` otherwise (argparse scripts pass it to ``parser.error``)."""
    try:
        values = [tuple(int(v) for v in item.split("x")) for item in text.split(",")]
    except ValueError:
        values = []
    if not values or any(len(v) != parts or min(v) < minimum for v in values):
        kind = "positive integers" if minimum == 1 else f"integers >= {minimum}"
        form = f"{kind} like 1,2,4" if parts == 1 else \
            f"{'x'.join('ABCDEFGH'[:parts])} groups of {kind} like {'x'.join(['4'] * parts)}"
        raise ValueError(f"{flag} {text!r} is not a comma-separated list of {form}.")
    return [v if parts > 1 else v[0] for v in values]


def out_file(path: str, flag: str = "--out") -> None:
    """ValueError naming ``flag`` unless a results file can be written at ``path`` (or it is empty: no file), so
    that a benchmark refuses the path before it runs rather than after."""
    folder = os.path.dirname(os.path.abspath(path)) if path else ""
    if path and (os.path.isdir(path) or not os.path.isdir(folder)):
        raise ValueError(f"{flag} {path!r}: {'that is a folder' if os.path.isdir(path) else f'no folder {folder}'}; "
                         f"give a file in an existing folder.")


def fail(text: str) -> None:
    """Print 'error: text' on stderr and exit with status 1. The line is the last thing on stderr: what
    threads of asynchronous readers print at interpreter shutdown (TensorStore reads that a failed Orbax
    restore left in flight post to a closed asyncio loop: "RuntimeError: Event loop is closed") is
    discarded; --debug keeps it."""
    sys.stdout.flush()
    print(f"error: {text}", file=sys.stderr, flush=True)
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    except OSError:
        pass
    sys.exit(1)


def _parse_flags(argv):
    debug = "--debug" in argv or "-debug" in argv
    try:
        rest = flags.FLAGS(argv)
        if flags.FLAGS["verbosity"].using_default_value:  # absl would raise it to INFO: Orbax logs ~40 lines a save
            flags.FLAGS.verbosity = logging.WARNING
        return rest
    except flags.Error as e:
        if debug:
            raise
        fail(message(e))
    except (AttributeError, KeyError) as e:  # an override of a field the config does not have
        text = _unknown_field(e, argv)
        if debug or text is None:
            raise
        fail(text)
    except USER_ERRORS as e:
        if debug:
            raise
        fail(message(e))


def run(main: Callable, *, errors: tuple = ()) -> None:
    """``app.run(main)`` with the behaviour in the module docstring; ``errors``: more exception types
    reported as one line (e.g. ImportError for a missing optional package)."""
    if "debug" not in flags.FLAGS:
        flags.DEFINE_bool("debug", False, "On an error, show the traceback instead of one line.")
    user_errors = USER_ERRORS + tuple(errors)
    quiet_platforms()

    def wrapped(argv):
        # Orbax's notes on every save and on read-only managers hidden, its errors shown; --verbosity=0 (INFO)
        # shows everything.
        verbose = flags.FLAGS["verbosity"].value >= logging.INFO
        checkpoint.quiet_orbax_logging(std_logging.NOTSET if verbose else std_logging.ERROR)
        try:
            return main(argv)
        except user_errors as e:
            if flags.FLAGS.debug:
                raise
            fail(message(e))

    app.run(wrapped, flags_parser=_parse_flags)
