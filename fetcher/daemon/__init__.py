"""The per-host fetcher daemon: its composition root and its faces.

``root`` (start-up, the lock, sockets, services), ``metrics`` (the ``stats`` reply and the
Prometheus collector), ``mountapi`` (the Unix-socket API for mounts), ``peerapp`` (the HTTP
API for other hosts' daemons), ``zygote_keeper`` (the mount zygote kept beside the daemon).

May import: lazycaf.core, lazycaf.cas, lazycaf.host, lazycaf.traces, fetcher.cache, fetcher.peers,
fetcher.fetching, fetcher.web.
"""
