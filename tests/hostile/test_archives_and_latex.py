"""e-print archives with members that try to leave the archive, and LaTeX built to be slow or to
explode: unsafe members are quarantined and never followed, cleaning is linear, a macro bomb is
capped and quarantined."""

from __future__ import annotations

import io
import os
import tarfile
import time

from llmray.data.readers import sources
from tests.hostile.child import read_source

PARAGRAPH = ("We study the convergence of stochastic gradient methods on smooth objectives and show "
             "that the rate improves when the step size decays.")


def add_member(archive: tarfile.TarFile, name: str, data: bytes = b"", **fields) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    archive.addfile(info, io.BytesIO(data))


def test_links_and_paths_leaving_the_archive_are_quarantined_and_nothing_is_written(shared_data, tmp_path):
    paper = tarfile.open(shared_data / "arxiv_latex_sample" / "2004.14974.tex.tar.gz")
    real = next(m for m in paper.getmembers() if m.isfile() and m.name.endswith(".tex"))
    tex = paper.extractfile(real).read()
    work = tmp_path / "work"
    work.mkdir()
    archive_path = work / "eprint.tar.gz"
    with tarfile.open(archive_path, "w:gz") as archive:
        add_member(archive, "main.tex", tex)
        add_member(archive, "../escape.tex", b"\\section{Escape} outside")
        add_member(archive, "/abs/escape.tex", b"\\section{Absolute} outside")
        add_member(archive, "link.tex", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add_member(archive, "hard.tex", type=tarfile.LNKTYPE, linkname="main.tex")
    before = sorted(p for p in tmp_path.rglob("*"))
    cwd = os.getcwd()
    os.chdir(work)
    try:
        source = sources.SourceConfig(name="arxiv", kind="latex", paths=[str(archive_path)])
        rows = [r for unit in sources.plan([source]) for r in sources.read_unit(unit, source, sources.ReadLimits())]
    finally:
        os.chdir(cwd)
    assert sorted(p for p in tmp_path.rglob("*")) == before
    kept = [r for r in rows if r["error"] is None]
    assert len(kept) == 1 and "main.tex" in kept[0]["meta"] and len(kept[0]["text"]) > 1000
    unsafe = sorted(r["message"].split("!")[1].split(":")[0] for r in rows if r["error"] == "UnsafeArchiveMember")
    assert unsafe == ["../escape.tex", "/abs/escape.tex", "hard.tex", "link.tex"]


def test_10_mb_of_tex_with_unclosed_environments_is_cleaned_in_under_5_s(tmp_path):
    block = f"{PARAGRAPH}\n\\begin{{tabular}}{{ll}} a & b \\\\\n\n"
    path = tmp_path / "slow.tex"
    path.write_text(block * (10_000_000 // len(block)))
    started = time.perf_counter()
    report = read_source({"name": "arxiv", "kind": "latex", "paths": [str(path)]}, {"max_doc_bytes": 12 << 20})
    assert time.perf_counter() - started < 5 and report["seconds"] < 5
    (row,) = report["rows"]
    assert row["error"] is None and row["text"].startswith("We study the convergence")


def test_a_macro_expansion_bomb_is_capped_and_quarantined(tmp_path):
    definitions = "".join(f"\\newcommand{{\\m{name}}}{{{PARAGRAPH * 20}}}\n" for name in "abcde")
    uses = " ".join(f"\\m{name}" for name in "abcde") * 2000  # ~40 KB that would expand to ~300 MB
    (tmp_path / "bomb.tex").write_text(f"{definitions}\\begin{{document}}\n{uses}\n\\end{{document}}\n")
    (tmp_path / "fine.tex").write_text(f"\\begin{{document}}\n{PARAGRAPH}\n\\end{{document}}\n")
    report = read_source({"name": "arxiv", "kind": "latex", "paths": [str(tmp_path)]})
    by_error = {row["error"]: row for row in report["rows"]}
    assert set(by_error) == {"LatexExpansionTooLarge", None}
    assert by_error["LatexExpansionTooLarge"]["message"].startswith(f"{tmp_path / 'bomb.tex'}: ")
    assert by_error[None]["text"] == PARAGRAPH[:80]
    assert report["peak_rss_mb"] < 512
