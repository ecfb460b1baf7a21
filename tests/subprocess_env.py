"""Environment shared by the tests that run training in subprocesses."""

# One XLA compilation cache for every such subprocess of the session: the runs compile the same programs again
# and again, and reading them back instead of recompiling halves each run on 2 CPU cores. It changes no
# result: a cached executable is the one the compiler produced. Filled by conftest's session fixture.
CACHE_ENV: dict[str, str] = {}
