"""Session set-up shared by the test modules.

The MovieLens-format fixtures (``ratings.dat``) are hand-written rows, but files of MovieLens' names
are not committed (MovieLens-1M may not be redistributed, and a reader cannot tell a synthetic file
from a copied one): they are written here, before any test runs, and ignored by git.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from training.checkpoint import KEY_ENV

FORMATS = Path(__file__).parent / "fixtures" / "formats"

# UserID::MovieID::Rating::Timestamp. Users 1-3 and 9, items 10-40: a duplicate event (line 4),
# unsorted timestamps and a user with one event, which the readers and the splits must handle.
_MOVIELENS_DAT = """\
1::20::4::200
1::10::5::100
2::10::3::50
1::20::4::200
3::30::2::300
3::10::1::300
3::20::5::100
9::40::3::10
2::30::4::60
1::20::2::250
"""
# Line 3's timestamp has a letter O for a zero: the reader must name the file and the line.
_MALFORMED_DAT = """\
1::10::4::100
1::20::3::110
2::10::5::12O
2::30::1::130
"""
GENERATED = {FORMATS / "movielens-dat" / "ratings.dat": _MOVIELENS_DAT,
             FORMATS / "malformed" / "ratings.dat": _MALFORMED_DAT}


def pytest_sessionstart(session) -> None:  # noqa: ARG001 (pytest's hook signature)
    # Checkpoints written by the tests are signed with a key of the session's own, not the user's.
    os.environ.setdefault(KEY_ENV, str(Path(tempfile.mkdtemp(prefix="genrec-key-")) / "checkpoint.key"))
    for path, text in GENERATED.items():
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
