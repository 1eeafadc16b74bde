"""seis: launcher and packaged trainer for seismic foundation models."""

__version__ = "0.1.0"
