"""PII redaction: e-mail addresses, IP addresses and phone numbers become placeholders.

Patterns are deliberately conservative (precision over recall, as in Dolma/FineWeb's PII steps):

* e-mail: RFC-5322-ish local part @ a domain with a dotted TLD;
* IPv4: four dot-separated octets 0–255 not embedded in a longer number or version string;
  IPv6: full or ``::``-compressed forms of hex groups with at least three colons;
* phone: North-American style ``(555) 123-4567`` / ``555-123-4567`` / ``+1 555 123 4567`` and
  international ``+CC`` numbers of 8–15 digits with separators. Bare digit runs are *not* phone
  numbers (they are years, ids, prices).

:func:`redact` returns the new text and counts per kind; the curate stage sums the counts into
the funnel report.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llmray.config import param

EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24}\b")
IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
                  r"(?!\w|\.\d)")
IPV6 = re.compile(r"(?<![\w:])(?:(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}|"
                  r"(?:[0-9A-Fa-f]{1,4}:){1,6}:(?:[0-9A-Fa-f]{1,4}:){0,5}[0-9A-Fa-f]{1,4})(?![\w:])")
PHONE = re.compile(r"(?<![\w+])(?:"
                   r"(?:\+1[ .-]?)?\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}"          # (555) 123-4567
                   r"|(?:\+1[ .-])?\d{3}[.-]\d{3}[.-]\d{4}"                 # 555-123-4567
                   r"|\+1 \d{3} \d{3} \d{4}"                                 # +1 555 123 4567
                   r"|\+(?:[2-9]\d{0,2})(?:[ .-]?\d{2,4}){2,5}"              # +44 20 7946 0958
                   r")(?!\w)")


@dataclass
class PIIConfig:
    """Which kinds of PII are replaced, and by what."""

    enabled: bool = param(True, doc="redact PII in kept documents")
    email: str | None = param("<EMAIL>", doc="placeholder for e-mail addresses (empty: keep them)")
    ip: str | None = param("<IP_ADDRESS>", doc="placeholder for IPv4/IPv6 addresses (empty: keep them)")
    phone: str | None = param("<PHONE>", doc="placeholder for phone numbers (empty: keep them)")


def redact(text: str, cfg: PIIConfig) -> tuple[str, dict[str, int]]:
    counts = {"email": 0, "ip": 0, "phone": 0}
    if not cfg.enabled:
        return text, counts
    if cfg.email and "@" in text:
        text, counts["email"] = EMAIL.subn(cfg.email, text)
    if cfg.ip and ("." in text or ":" in text):
        text, v4 = IPV4.subn(cfg.ip, text)
        text, v6 = _redact_ipv6(text, cfg.ip)
        counts["ip"] = v4 + v6
    if cfg.phone:
        text, counts["phone"] = PHONE.subn(cfg.phone, text)
    return text, counts


def _redact_ipv6(text: str, placeholder: str) -> tuple[str, int]:
    """IPv6 candidates with at least 3 colons (so ``a::b`` in C++ or ``12:30`` times stay)."""
    count = 0

    def replace(match: re.Match) -> str:
        nonlocal count
        if match.group(0).count(":") < 3:
            return match.group(0)
        count += 1
        return placeholder

    return IPV6.sub(replace, text), count
