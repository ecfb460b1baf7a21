"""Corpora tokenised once (prepare_data.py) and read from disk: `store` is the format and its memory-mapped reader,
`sources` reads the input files, `prepare` is the parallel, resumable tokeniser, `shuffle` the seeded bijection
the loader orders and holds out rows with. Kept import-light: `llama_jax.data` imports `shuffle`."""
