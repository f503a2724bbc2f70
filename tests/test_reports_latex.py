"""The LaTeX table of ``sdetr report`` compiles with a real TeX engine (pdflatex)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from test_reports import report, store  # noqa: F401  (fixtures: a store of known runs, its report)

DOCUMENT = r"""\documentclass{article}
\usepackage[utf8]{inputenc}
\usepackage[T1]{fontenc}
\usepackage{booktabs}
\usepackage{amssymb}
\usepackage{graphicx}
\begin{document}
\input{table1.tex}
\end{document}
"""


def pdflatex() -> str:
    """Path of pdflatex; CI installs it (.ci/run), elsewhere the test is skipped without."""
    path = shutil.which("pdflatex")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("pdflatex is missing: .ci/run installs texlive-latex-base and "
                        "texlive-latex-recommended")
        pytest.skip("pdflatex not installed (apt-get install texlive-latex-base "
                    "texlive-latex-recommended)")
    return path


def test_table1_tex_compiles_inside_a_document(report, tmp_path):  # noqa: F811
    shutil.copy(report["out"] / "table1.tex", tmp_path / "table1.tex")
    (tmp_path / "doc.tex").write_text(DOCUMENT)
    proc = subprocess.run([pdflatex(), "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 1000
    assert "Undefined control sequence" not in proc.stdout
