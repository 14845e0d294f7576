"""LazyCAF's benchmarks, their shared harness (``harness``) and the page renderer, run as
modules from the repository root: ``.venv/bin/python -m scripts.bench_prefetch --quick``.

``netsim.py`` and ``build_sample.py`` also run as plain scripts (netsim starts its proxies by
file path; build_sample is standalone)."""
