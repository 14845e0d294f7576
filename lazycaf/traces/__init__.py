"""Access traces and profiles.

``trace`` (trace records, profile merge, prefetch plans: pure) and ``profiles`` (profiles
stored in the CAS under ``profiles/<name>`` refs).

May import: lazycaf.core, lazycaf.cas.
"""
