"""normtf: batch, layer and group normalization on an MNIST CNN, in Keras 3 / TensorFlow."""

__version__ = "0.1.0"
