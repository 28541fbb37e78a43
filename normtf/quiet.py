"""A quiet TensorFlow start. On a machine without a GPU, importing TensorFlow and looking for GPUs
prints half a dozen lines from its C++ runtime ("All log messages before absl::InitializeLog()",
"Could not find cuda drivers", "failed call to cuInit") straight to file descriptor 2, before any
Python logging and before TF_CPP_MIN_LOG_LEVEL is read. They say nothing a CPU user can act on,
so the CLI starts TensorFlow with descriptor 2 pointed at a temporary file, and shows that file
only if the start fails (or with `normtf --verbose`, which does not redirect at all). The start is
also the one moment TensorFlow's thread pools can be sized, so `normtf --threads` is applied here.
"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager

verbose = False  # set by `normtf --verbose`
threads: int | None = None  # set by `normtf --threads`: TensorFlow's intra- and inter-op threads
_started = False


@contextmanager
def _stderr_to_file():
    """Descriptor 2 (C++ and Python writes alike) into a temporary file for the block; on an
    exception the captured text is written back to the real stderr, so an error is seen whole.
    Not on an interruption (Ctrl-C, SIGTERM): the start-up lines say nothing about it, and the
    user's one line ("interrupted") must be all there is."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        except KeyboardInterrupt:
            raise
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved, 2)
            capture.seek(0)
            os.write(2, capture.read())
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def start_tensorflow() -> None:
    """Import TensorFlow and let it look for GPUs (where cuInit reports), once, quietly; with
    `threads` set, TensorFlow's thread pools are that size (settable only before it starts)."""
    global _started
    if _started:
        return
    if verbose:
        import tensorflow as tf

        _set_threads(tf)
        tf.config.list_physical_devices("GPU")
    else:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # and its later INFO/WARNING lines
        with _stderr_to_file():
            import tensorflow as tf

            _set_threads(tf)
            tf.config.list_physical_devices("GPU")
        # TensorFlow's Python-side warnings (e.g. "triggered tf.function retracing" when a command
        # evaluates several models in turn) are about TensorFlow's internals, not the user's run.
        tf.get_logger().setLevel("ERROR")
    _started = True


def _set_threads(tf) -> None:
    if threads is not None:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
