"""XLA for the element-wise work of normtf's layers, where XLA compiles; TensorFlow's own ops where
it cannot.

XLA writes an element-wise expression as one loop over the elements, where TensorFlow makes one
pass per operation: dropout's hashed mask and the norm layers' expressions go through `compiled`.
Not every TensorFlow has XLA (tensorflow-metal on a Mac's GPU is the common one without), so
whether it compiles is found out once (`available`, a tiny compiled function) and, where it does
not, `compiled` gives the expression itself: the same operations, run one by one, the same values
to float32 rounding (tests/test_without_xla.py), slower. `normtf --verbose` says which.
"""

from __future__ import annotations

import sys

import keras

from normtf import quiet

_COMPILED = {}  # fn -> what `compiled` gives for it, made on first use (TensorFlow is imported lazily)
_available: bool | None = None  # whether XLA compiles here, found out by the first `available()`


def available() -> bool:
    """Whether XLA can compile and run a function here: found out once, by compiling a tiny one.
    Any failure (no XLA in this TensorFlow, no XLA backend for the device) means no."""
    global _available
    if _available is None:
        import tensorflow as tf

        try:
            with tf.init_scope():  # eagerly, even when first asked inside a trace
                tf.function(lambda x: x * 2 + 1, jit_compile=True)(tf.constant([1.0]))
            _available, found = True, "XLA compiles here: dropout's mask and the norm layers' expressions are XLA calls"
        except Exception as e:  # noqa: BLE001  (what a missing XLA raises differs by build and device)
            _available = False
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            found = (f"XLA cannot compile here ({type(e).__name__}: {reason}): dropout's mask and the norm "
                     "layers' expressions run as TensorFlow's own ops")
        if quiet.verbose:
            print(f"normtf: {found}", file=sys.stderr, flush=True)
    return _available


def compiled(fn):
    """fn as one XLA-compiled call (TensorFlow only), or fn itself where XLA cannot compile. On
    this CPU, reductions are what XLA does slowly, so only element-wise work goes through here.
    Inside a trace that XLA already compiles, the call is inlined there."""
    if fn not in _COMPILED:
        import tensorflow as tf

        _COMPILED[fn] = (tf.function(fn, jit_compile=True, autograph=False, reduce_retracing=False)
                         if available() else fn)
    return _COMPILED[fn]


def elementwise(fn, *args):
    """fn(*args) for the norm layers: one XLA call on TensorFlow (block 2's backward expression
    took 0.93 against 2.3 ms as TensorFlow's four ops, the forward one 0.85 against 1.6), the ops
    as they are on other backends and where XLA cannot compile."""
    return compiled(fn)(*args) if keras.backend.backend() == "tensorflow" else fn(*args)


def compiled_by_xla() -> bool:
    """Whether the graph being traced will be compiled by XLA (tf.function(jit_compile=True), as
    Keras's compile(jit_compile=True) makes it). TensorFlow marks such a trace with an XLA control
    flow context and its own ops ask this same private helper (no public API says it); should it
    move, every trace is taken as XLA's: always compilable, at the one-pass op's speed cost.
    tests/test_layers.py checks both answers on real traces."""
    try:
        import tensorflow as tf
        from tensorflow.python.ops.control_flow_util import GraphOrParentsInXlaContext
    except ImportError:
        return True
    return not tf.executing_eagerly() and GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())
