"""HTML extraction and WARC reading, including recovery from broken and truncated records."""

from __future__ import annotations

import gzip

from llmray.data.readers import html

LIMIT = 10 << 20

PAGE = b"""<html><head><title>t</title><script>var tracking = 1;</script></head><body>
<nav><a href="/">Home</a> <a href="/about">About</a></nav>
<article><h1>Real heading</h1><p>The first paragraph of the article has enough words to be the main content.</p>
<p>The second paragraph continues the article with more real sentences about the topic.</p></article>
<footer>Copyright 2024 Example Corp. All rights reserved.</footer></body></html>"""


def test_main_text_extraction_drops_scripts_and_keeps_paragraphs():
    text = html.extract_text(html.decode_html(PAGE))
    assert "The first paragraph" in text and "The second paragraph" in text
    assert "tracking" not in text
    assert text.index("first paragraph") < text.index("second paragraph")


def test_gzip_members_resume_after_a_corrupt_member_and_report_truncation(tmp_path):
    members = [gzip.compress(f"record {i}\n".encode() * 50) for i in range(4)]
    broken = bytearray(members[1])
    broken[20:40] = b"\x00" * 20  # corrupt the deflate stream of member 1
    truncated = members[3][: len(members[3]) // 2]
    path = tmp_path / "x.gz"
    path.write_bytes(members[0] + bytes(broken) + members[2] + truncated)
    found = list(html.gzip_members(path, LIMIT))
    offsets = [offset for offset, _ in found]
    assert offsets[0] == 0 and offsets[1] == len(members[0])
    good = [m for _, m in found if isinstance(m, bytes)]
    errors = [(o, m) for o, m in found if isinstance(m, Exception)]
    assert good == [gzip.decompress(members[0]), gzip.decompress(members[2])]
    assert errors[0][0] == len(members[0]) and isinstance(errors[-1][1], EOFError)


def test_warc_records_real_file_and_injected_corruption(shared_data, tmp_path):
    original = shared_data / "web_cc_warc" / "resiliparse_warcfile.warc.gz"
    clean = list(html.iter_warc(original, "warc", "resiliparse", LIMIT))
    assert len(clean) >= 10 and all(d.error is None for d in clean)
    assert all(d.url and d.url.startswith("http") for d in clean)
    data = original.read_bytes()
    # Corrupt the bytes of the 4th record's gzip member: that record is quarantined, the rest read.
    victim = clean[3].offset
    broken = data[:victim + 30] + b"\x00" * 64 + data[victim + 94:]
    (tmp_path / "broken.warc.gz").write_bytes(broken)
    after = list(html.iter_warc(tmp_path / "broken.warc.gz", "warc", "resiliparse", LIMIT))
    errors = [d for d in after if d.error]
    assert [d.offset for d in errors] == [victim]
    assert [d.url for d in after if not d.error] == [d.url for d in clean if d.offset != victim]
    # Truncation inside the last record: everything before it is kept, the cut is reported.
    (tmp_path / "cut.warc.gz").write_bytes(data[: clean[-1].offset + 100])
    cut = list(html.iter_warc(tmp_path / "cut.warc.gz", "warc", "resiliparse", LIMIT))
    assert [d.url for d in cut if not d.error] == [d.url for d in clean[:-1]]
    assert cut[-1].error == "EOFError" and cut[-1].offset == clean[-1].offset
