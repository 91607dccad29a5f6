"""Error classes a user names (`recap retry --errors`, `recap run --retry-errors`), checked
the same way for both."""

from __future__ import annotations

from recap.errors import ErrorClass, RecapError


def error_classes(text: str, flag: str) -> list[str]:
    """`timeout,http_5xx` as a list; an unknown or missing class is a one-line error."""
    classes = [c.strip() for c in text.split(",") if c.strip()]
    known = {e.value for e in ErrorClass}
    unknown = [c for c in classes if c not in known]
    if unknown or not classes:
        raise RecapError(
            f"{flag}: unknown error class(es) {', '.join(unknown) or '(none)'}; "
            f"known: {', '.join(sorted(known))}"
        )
    return classes
