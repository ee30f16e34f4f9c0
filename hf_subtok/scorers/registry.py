"""A name -> class registry, shared by the group and the token scorers."""

from __future__ import annotations


class Registry:
    """Classes registered by their `name` attribute; `field` is the config field naming them."""

    def __init__(self, kind: str, field: str):
        self.kind = kind
        self.field = field
        self._classes: dict[str, type] = {}

    def register(self, cls: type) -> type:
        """Class decorator: make `cls` available under `cls.name`."""
        if not cls.name:
            raise ValueError(f"{self.kind} {cls.__name__} has an empty name")
        if cls.name in self._classes and self._classes[cls.name] is not cls:
            raise ValueError(f"{self.kind} name {cls.name!r} is already registered")
        self._classes[cls.name] = cls
        return cls

    def names(self) -> tuple[str, ...]:
        return tuple(self._classes)

    def create(self, name: str):
        if name not in self._classes:
            raise ValueError(f"{self.field} must be one of {sorted(self._classes)}, got {name!r}")
        return self._classes[name]()
