"""cascade_rt: fast, lean inference for the Stable Cascade text-to-image cascade."""

__version__ = "0.1.0"
