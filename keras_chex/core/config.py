"""A pruning method's configuration: typed, validated once, versioned.

Every method describes what its entry point takes as a frozen dataclass
derived from `MethodConfig`: the target (`flops=0.5` becomes
`target="flops", target_value=0.5`), the options every method shares
(`min_channels`, `round_to`, `seed`, a latency `cost_table`) and its own
fields. Building one checks every field, with an error naming the argument
and what it takes; the entry point then stores `to_dict()` in the wrapped
model's `pruning_config`, and the method's state reads it back with
`from_dict`, so a `.keras` file written by an older keras-chex still loads
(`upgrade` fills in what it did not store) and one written by a newer
version is refused with a clear error instead of being misread.
"""

import dataclasses
from typing import ClassVar

from keras_chex.core import checks

# What each target the methods know means, for the "give exactly one
# target" error.
TARGET_MEANINGS = {
    "flops": "fraction of MACs to keep",
    "params": "fraction of parameters to keep",
    "latency": "fraction of the predicted latency to keep",
    "sparsity": "fraction of channels to remove",
    "channels": "channels removed per step",
}

# Keys of a `pruning_config` that belong to the wrapping, not the method.
_WRAPPING_KEYS = ("method", "method_version", "config_version", "exclude",
                  "mask_mode", "input_shape", "config_repairs")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MethodConfig:
    """The configuration every pruning method shares.

    Subclasses set `method` (the registered name) and `targets` (the
    targets the entry point takes, in the order its error lists them), add
    their own fields with defaults, check them in `check()`, and raise
    `version` when the meaning of a stored field changes (then `upgrade`
    translates the older form).

    Attributes:
        target: what the budget counts: "flops", "params", "latency", ...
        target_value: the budget (a fraction of dense for a cost).
        min_channels: fewest channels a group keeps: an int >= 1, or a
            float in (0, 1) for a fraction of its size.
        round_to: widths are multiples of this, or a group's full size.
        seed: an int; None draws one (stored, so a loaded model continues
            with the same draws).
        cost_table: with a latency target, the entries of the latency
            table the model uses (`method.latency_config`).

    Example:

    ```python
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class OneShotConfig(MethodConfig):
        method: ClassVar[str] = "one_shot"
        targets: ClassVar[tuple] = ("flops",)
        criterion: str = "l1"

        def check(self):
            checks.check_choice("criterion", self.criterion, ("l1",))

    config = OneShotConfig.from_arguments({"flops": 0.5}, seed=0)
    stored = config.to_dict()   # what the wrapped model saves
    assert OneShotConfig.from_dict(stored) == config
    ```
    """

    method: ClassVar[str] = None
    version: ClassVar[int] = 1
    targets: ClassVar[tuple] = ("flops", "params", "latency")

    target: str
    target_value: float
    min_channels: object = 1
    round_to: int = 1
    seed: object = None
    cost_table: object = None

    def __post_init__(self):
        if self.target not in self.targets:
            raise ValueError(
                f"{self.method or 'This method'} takes a target of "
                f"{', '.join(self.targets)}; got {self.target!r}.")
        self.check_target()
        self._set("target_value", float(self.target_value))
        self._set("round_to", checks.check_round_to(self.round_to))
        checks.check_min_channels(self.min_channels)
        self._set("seed", checks.resolve_seed(self.seed))
        self.check()

    def _set(self, name, value):
        # Normalising a frozen field while it is built.
        object.__setattr__(self, name, value)

    def check_target(self):
        """Raises unless `target_value` suits `target`; a fraction in
        (0, 1] of dense for a cost."""
        checks.check_fraction(self.target, self.target_value)

    def check(self):
        """Raises a ValueError naming the argument a field came from when
        it is invalid (a subclass's own fields); may normalise them."""

    @classmethod
    def from_arguments(cls, targets, **fields):
        """The config of an entry point's call.

        Args:
            targets: dict target name -> the value the user passed (None
                when not given); exactly one must be given.
            **fields: the other fields.

        Raises:
            ValueError: none or several targets, or an invalid field.
        """
        target, _ = checks.one_target(
            targets, {t: TARGET_MEANINGS[t] for t in targets})
        # The value as given: `check_target` judges it before it becomes a
        # float (`channels=2.5` is refused, not rounded).
        return cls(target=target, target_value=targets[target], **fields)

    def replace(self, **changes):
        """A copy with `changes`, checked again."""
        return dataclasses.replace(self, **changes)

    def to_dict(self):
        """What the wrapped model stores (JSON-serialisable)."""
        return {"method": self.method, "method_version": self.version,
                **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, stored):
        """The config a model stored, from this or an older version.

        Args:
            stored: a `pruning_config` dict (keys that belong to the
                wrapping, such as "exclude", are ignored).

        Raises:
            ValueError: `stored` comes from a newer version of the method's
                config, or (when it names its version) holds a field this
                version does not know.
        """
        version = stored.get("method_version", 1)
        if version > cls.version:
            raise ValueError(
                f"This model's {cls.method} configuration is version "
                f"{version}, from a newer keras-chex (this one reads up to "
                f"{cls.version}). Upgrade keras-chex to load it.")
        typed = "method_version" in stored
        stored = cls.upgrade(dict(stored), version)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(stored) - names - set(_WRAPPING_KEYS))
        # Files from before typed configs may hold keys since retired;
        # a typed file with a field this version lacks is another version.
        if unknown and typed:
            raise ValueError(
                f"This model's {cls.method} configuration has fields this "
                f"keras-chex does not know ({', '.join(unknown)}): it was "
                "saved by another version. Load it with that version.")
        return cls(**{k: v for k, v in stored.items() if k in names})

    @classmethod
    def upgrade(cls, stored, version):
        """`stored`, written by config `version`, in this version's form
        (fields it lacks take their defaults)."""
        return stored
