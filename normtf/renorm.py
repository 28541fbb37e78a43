"""Batch renormalization (Ioffe, 2017), the `batch-renorm` variant: batch norm whose training
output is corrected towards the moving statistics, so that training computes what inference will.

In training, with the batch's mean mu_B and sigma_B = sqrt(var_B + eps), and the moving ones mu and
sigma = sqrt(moving_variance + eps):

    r = clip(sigma_B / sigma, 1/rmax, rmax),   d = clip((mu_B - mu) / sigma, -dmax, dmax)
    y = gamma * ((x - mu_B) / sigma_B * r + d) + beta

r and d are constants to the gradient (stop_gradient), as in the paper's algorithm 1. With r = 1
and d = 0 this is batch norm; unclipped it is the inference output, (x - mu) / sigma. The clipping
starts at rmax = 1, dmax = 0 (plain batch norm while the moving statistics settle) and is relaxed
linearly to rmax = 3, dmax = 5 after a warm-up: the paper's steps divided by ten (docs/how-it-works.md
says why). Each layer counts its own training steps in a weight, so a resumed run (its checkpoint
holds the weights) continues the schedule where it stopped.

Inference is Keras's batch norm, and a saved model holds a plain keras.layers.BatchNormalization
with the moving statistics (`saved_as`): the counter and the schedule are training's business.
Plain Keras, no fused path: correctness and clarity over speed.
"""

from __future__ import annotations

import keras
from keras import ops

# The paper's schedule (section 4: rmax 1 -> 3 at 40k steps, dmax 0 -> 5 at 25k, after 5k steps of
# batch norm) with its steps divided by ten: a 20-epoch run of 469 steps an epoch is 9,380 steps.
R_MAX, D_MAX = 3.0, 5.0
WARMUP_STEPS, R_MAX_STEP, D_MAX_STEP = 500, 4_000, 2_500


@keras.saving.register_keras_serializable(package="normtf")
class BatchRenormalization(keras.layers.BatchNormalization):
    """keras.layers.BatchNormalization with batch renormalization in training (channels last)."""

    def __init__(self, r_max: float = R_MAX, d_max: float = D_MAX, warmup_steps: int = WARMUP_STEPS,
                 r_max_step: int = R_MAX_STEP, d_max_step: int = D_MAX_STEP, **kwargs):
        super().__init__(**kwargs)
        if not warmup_steps < min(r_max_step, d_max_step):
            raise ValueError(f"the warm-up ({warmup_steps} steps) must end before rmax and dmax are reached "
                             f"(steps {r_max_step} and {d_max_step})")
        self.r_max, self.d_max = float(r_max), float(d_max)
        self.warmup_steps, self.r_max_step, self.d_max_step = int(warmup_steps), int(r_max_step), int(d_max_step)

    def build(self, input_shape):
        if self.axis not in (-1, len(input_shape) - 1):
            raise ValueError(f"BatchRenormalization normalizes channels last (axis -1); got axis {self.axis}")
        super().build(input_shape)
        # float32 counts exactly up to 2^24 steps; one replica's count, as every replica steps together
        self.step = self.add_weight(shape=(), initializer="zeros", dtype="float32", trainable=False,
                                    autocast=False, aggregation="only_first_replica", name="step")

    def limits(self, step):
        """(rmax, dmax) at training step `step` (0-based): 1 and 0 through the warm-up, then linear to
        r_max at r_max_step and to d_max at d_max_step, constant after."""
        def ramp(end):
            return ops.clip((ops.cast(step, "float32") - self.warmup_steps) / (end - self.warmup_steps), 0.0, 1.0)

        return 1.0 + (self.r_max - 1.0) * ramp(self.r_max_step), self.d_max * ramp(self.d_max_step)

    def corrections(self, mean, variance, clip: bool = True):
        """r and d for a batch's per-channel mean and (biased) variance, against the moving
        statistics, clipped to this step's limits (clip=False: as they would be unclipped)."""
        sigma = ops.sqrt(ops.cast(self.moving_variance, "float32") + self.epsilon)
        r = ops.sqrt(variance + self.epsilon) / sigma
        d = (mean - ops.cast(self.moving_mean, "float32")) / sigma
        if clip:
            r_max, d_max = self.limits(self.step)
            r, d = ops.clip(r, 1.0 / r_max, r_max), ops.clip(d, -d_max, d_max)
        return ops.stop_gradient(r), ops.stop_gradient(d)

    def call(self, inputs, training=None, mask=None):
        if not training or not self.trainable:
            return super().call(inputs, training=False, mask=mask)  # batch norm's inference
        x = ops.cast(inputs, "float32")  # statistics in float32 under mixed precision, as Keras's
        mean, variance = ops.moments(x, axes=list(range(len(x.shape) - 1)))
        r, d = self.corrections(mean, variance)
        normalized = (x - mean) * (r * ops.rsqrt(variance + self.epsilon)) + d
        out = normalized * ops.cast(self.gamma, "float32") + ops.cast(self.beta, "float32")
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        self.step.assign_add(1.0)
        return ops.cast(out, self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "r_max": self.r_max, "d_max": self.d_max, "warmup_steps": self.warmup_steps,
                "r_max_step": self.r_max_step, "d_max_step": self.d_max_step}

    def saved_as(self):
        """What a model file holds in this layer's place (normtf.model_files.save_model): Keras's batch
        norm with this layer's config, gamma, beta and moving statistics; what inference computes."""
        layer = keras.layers.BatchNormalization.from_config(keras.layers.BatchNormalization.get_config(self))
        layer.build((None,) * (self.input_spec.ndim - 1) + (self.moving_mean.shape[0],))  # the rank it was built for
        layer.set_weights([v.numpy() for v in (self.gamma, self.beta, self.moving_mean, self.moving_variance)])
        return layer
