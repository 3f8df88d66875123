"""SMCP's choice of channel importance (computed by `core.importance`)."""

IMPORTANCES = ("taylor", "magnitude")


def check_importance(importance):
    if importance not in IMPORTANCES:
        raise ValueError(
            f"`importance` must be one of {IMPORTANCES}, got {importance!r}."
        )
    return importance
