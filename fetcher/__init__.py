"""The per-host fetcher daemon and the HTTP servers (CAS role, peer role)."""
