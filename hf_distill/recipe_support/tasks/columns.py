"""Which dataset column holds what, for the task loaders."""


def pick_column(columns: list[str], given: str | None, candidates: tuple[str, ...], what: str, flag: str) -> str:
    """`given` when the data has it, else the first of `candidates` it has; a clear error naming `flag` otherwise."""
    if given is not None:
        if given not in columns:
            raise ValueError(f"The data has no {what} column {given!r} (columns: {columns}). Fix {flag}.")
        return given
    for name in candidates:
        if name in columns:
            return name
    raise ValueError(
        f"The data has none of the {what} columns {list(candidates)} (columns: {columns}). Name it with {flag}."
    )
