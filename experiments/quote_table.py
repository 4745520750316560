"""Put a generated table into a page between its markers, so the page quotes the
result file instead of a hand copy:

    python experiments/quote_table.py docs/results.md modern docs/results/modern_summary.md

replaces what lies between ``<!-- modern:start -->`` and ``<!-- modern:end -->``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def main(page: str, name: str, table: str) -> None:
    text = Path(page).read_text()
    body = Path(table).read_text().strip()
    pat = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
    if not pat.search(text):
        sys.exit(f"{page} has no <!-- {name}:start --> ... <!-- {name}:end --> markers")
    Path(page).write_text(pat.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text))


if __name__ == "__main__":
    main(*sys.argv[1:4])
