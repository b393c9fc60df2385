"""The error catalog: unique codes, complete entries, and docs/errors.md in step with it."""

from __future__ import annotations

from pathlib import Path

from vmvault.errors import CATALOG, OPERATION_IN_PROGRESS, VmvaultError, catalog_markdown


def test_entries_are_complete() -> None:
    for code, entry in CATALOG.items():
        assert entry.code == code
        assert entry.message and entry.action, code
        assert entry.action.endswith("."), f"{code}: an action is a sentence"
        assert entry.severity in ("error", "warning"), code
        if entry.severity == "error":
            assert 400 <= entry.http_status < 600, code


def test_message_is_filled_and_round_trips() -> None:
    err = VmvaultError(OPERATION_IN_PROGRESS, name="vm1", job_id="j-1")
    assert err.message == "Another operation is in progress on 'vm1' (job j-1)."
    again = VmvaultError.from_dict(err.to_dict(), 409)
    assert (again.code, again.message, again.action) == (err.code, err.message, err.action)


def test_docs_errors_md_is_generated_from_the_catalog() -> None:
    doc = Path(__file__).parent.parent / "docs" / "errors.md"
    assert doc.read_text() == catalog_markdown(), "run: python -m vmvault.errors > docs/errors.md"


def test_every_troubleshooting_row_has_a_test_that_makes_it_happen() -> None:
    """Each entry answering a row of the troubleshooting guide is checked, by its code, in a
    test that makes the situation happen (through the CLI, in the files below)."""
    from vmvault.errors import NOT_APPLICABLE

    tests = Path(__file__).parent
    text = "".join(p.read_text() for p in tests.glob("test_*.py") if p.name != Path(
        __file__).name)
    untested = sorted(f"{e.row}: {e.code}" for e in CATALOG.values()
                      if e.row and f'"{e.code}"' not in text and f"({e.code})" not in text)
    assert untested == [], untested
    rows = {r.strip() for e in CATALOG.values() for r in e.row.split(",") if r.strip()}
    rows |= {n.row for n in NOT_APPLICABLE}
    guide = {f"B{i}" for i in range(1, 15)} | {f"S{i}" for i in range(1, 5)} | {
        f"J{i}" for i in range(1, 5)} | {f"R{i}" for i in range(1, 12)}
    assert guide - rows <= {"S2"}, sorted(guide - rows)  # S2 is a behaviour, not an error
