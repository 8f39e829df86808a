"""Imports resolved by module, never by a name's ending: each package's relative ``utils`` is
its own, and ``all_reduce_utils`` is not ``utils``. Packages sort so that the wrong module
comes first, where a first-match rule took it."""
