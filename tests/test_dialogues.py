"""Every transcript in tests/dialogues/ (see its README), run whole, byte by byte and in seeded random splits."""

from __future__ import annotations

from pathlib import Path

import pytest
from transcript import MODES, Mismatch, TranscriptError, run

TRANSCRIPTS = sorted((Path(__file__).parent / "dialogues").glob("*.smtp"))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", TRANSCRIPTS, ids=[path.stem for path in TRANSCRIPTS])
def test_transcript(path: Path, mode: str) -> None:
    try:
        run(path, mode)
    except (Mismatch, TranscriptError) as e:
        message = str(e)
    else:
        return
    pytest.fail(message, pytrace=False)
