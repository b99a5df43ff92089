"""Readers: raw sources (JSONL, text, CSV, parquet, WARC/WET, HTML, LaTeX, code, this machine's text) → document rows."""
