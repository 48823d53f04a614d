"""scconv-ablate: build, train and search SCConv variants."""

__version__ = "0.1.0"
