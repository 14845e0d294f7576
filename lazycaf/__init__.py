"""LazyCAF: content-addressed, lazily fetched Python executables."""

__version__ = "0.1.0"
