"""The single source of netjail's version."""

__version__ = "0.1.0"
