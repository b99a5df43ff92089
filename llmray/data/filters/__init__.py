"""Filters: normalization, heuristic quality rules, fastText classifiers, PII redaction."""
