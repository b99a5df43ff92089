"""Token shards: the writer/reader and manifest (shards.py), the Ray Data stage (tokenize.py) and
the packed, exactly resumable training loader (loader.py)."""
