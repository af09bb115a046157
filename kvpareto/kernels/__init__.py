"""Compiled kernels and the attention that runs them: below `models` (the loader installs the
"kvpareto" attention) and `kv` (caches hand decode steps over to it)."""
