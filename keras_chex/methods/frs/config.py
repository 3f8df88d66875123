"""FRS's configuration: what `relevance_prune` takes, checked once."""

import dataclasses
import numbers
from typing import ClassVar

from keras_chex.core import checks
from keras_chex.core import config
from keras_chex.core import schedule as schedule_lib

CRITERIA = ("relevance", "l1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FrsConfig(config.MethodConfig):
    """The arguments of `keras_chex.relevance_prune`, as the model stores
    them (see that function for their meaning).

    Example:

    ```python
    config = FrsConfig.from_arguments({"channels": 4}, seed=0)
    assert config.target_value == 4 and config.criterion == "relevance"
    ```
    """

    method: ClassVar[str] = "frs"
    targets: ClassVar[tuple] = ("flops", "params", "latency", "channels")

    min_channels: object = 0.05
    interval: float = 2.0
    until: float = 0.75
    score_batches: int = 10
    criterion: str = "relevance"

    def check_target(self):
        if self.target != "channels":
            return super().check_target()
        value = self.target_value
        if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                or value < 1):
            raise ValueError(
                f"`channels` must be an int >= 1 (channels removed per "
                f"pruning step), got {value!r}.")

    def check(self):
        if self.target == "channels":
            self._set("target_value", int(self.target_value))
        for name, value in self.schedule().get_config().items():
            self._set(name, value)
        if (isinstance(self.score_batches, bool)
                or not isinstance(self.score_batches, numbers.Integral)
                or self.score_batches < 1):
            raise ValueError(f"`score_batches` must be an int >= 1, got "
                             f"{self.score_batches!r}.")
        self._set("score_batches", int(self.score_batches))
        checks.check_choice("criterion", self.criterion, CRITERIA)

    @classmethod
    def upgrade(cls, stored, version):
        # Before typed configs, a channel count was stored as a float.
        if ("method_version" not in stored
                and stored.get("target") == "channels"):
            stored["target_value"] = int(stored["target_value"])
        return stored

    def schedule(self):
        """The `PeriodicSchedule` of the pruning steps (checks it)."""
        return schedule_lib.PeriodicSchedule(interval=self.interval,
                                             until=self.until)
