"""Tables as text and Markdown, for the summary of one run (summary.py) and the report across runs (report.py).

A table is a header (one string per column) and lines of cells (strings, one per column); ``align`` says per
column ``"<"`` (left) or ``">"`` (right). The cells come from :func:`cell`.
"""

import math


def cell(value, digits=3, missing="-"):
    """One value as a table cell: ``missing`` for None or NaN, a float with ``digits`` decimals (as it is when
    ``digits`` is None), anything else as ``str``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    if isinstance(value, float) and digits is not None:
        return f"{value:.{digits}f}"
    return str(value)


def text_table(header, lines, align, indent=""):
    """The table as fixed-width lines: every column as wide as its widest cell, two spaces between columns,
    ``indent`` before each line, trailing blanks dropped."""
    widths = [max(len(text) for text in column) for column in zip(header, *lines)]
    return [
        (
            indent
            + "  ".join(
                text.ljust(width) if side == "<" else text.rjust(width)
                for text, width, side in zip(cells, widths, align)
            )
        ).rstrip()
        for cells in (header, *lines)
    ]


def markdown_table(header, lines, align):
    """The table as Markdown lines (header, separator, one line per row); a ``|`` inside a cell is escaped."""

    def row(cells):
        return "| " + " | ".join(text.replace("|", "\\|") for text in cells) + " |"

    separator = "|" + "".join("---|" if side == "<" else "---:|" for side in align)
    return [row(header), separator, *(row(cells) for cells in lines)]


def markdown_page(title, header, lines, align, footer):
    """A Markdown document: ``# title``, the table, then the ``footer`` lines after a blank line."""
    return "\n".join([f"# {title}", "", *markdown_table(header, lines, align), "", *footer]) + "\n"
