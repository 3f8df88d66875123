"""CHEX's configuration: what `prune_and_regrow` takes, checked once."""

import dataclasses
from typing import ClassVar

from keras_chex.core import checks
from keras_chex.core import config
from keras_chex.methods.chex import schedules

ALLOCATORS = ("threshold", "knapsack", "uniform")
PRUNED_IMPORTANCES = ("zero", "last")
STREAMS = ("prune", "keep")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChexConfig(config.MethodConfig):
    """The arguments of `keras_chex.prune_and_regrow`, as the model stores
    them (see that function for their meaning).

    `allocator=None` becomes the target's default: "knapsack" for a
    latency target, "threshold" otherwise (and for files saved before
    there was a choice).

    Example:

    ```python
    config = ChexConfig.from_arguments({"flops": 0.5}, seed=0)
    assert config.allocator == "threshold" and config.regrow == 0.3
    ```
    """

    method: ClassVar[str] = "chex"
    targets: ClassVar[tuple] = ("flops", "params", "sparsity", "latency")

    min_channels: object = 0.05
    regrow: float = 0.3
    interval: float = 2.0
    until: float = 0.72
    allocator: object = None
    pruned_importance: str = "zero"
    streams: str = "prune"
    gamma_l1: float = 0.0

    def check_target(self):
        if self.target == "sparsity":
            checks.check_fraction("sparsity", self.target_value,
                                  low_open=False, high_closed=False)
        else:
            super().check_target()

    def check(self):
        self._set("allocator", _allocator(self.allocator, self.target))
        checks.check_fraction("regrow", self.regrow, low_open=False,
                              high_closed=False)
        for name, value in self.schedule().get_config().items():
            self._set(name, value)
        checks.check_choice("pruned_importance", self.pruned_importance,
                            PRUNED_IMPORTANCES)
        checks.check_choice("streams", self.streams, STREAMS)
        if not checks.is_number(self.gamma_l1) or self.gamma_l1 < 0:
            raise ValueError("`gamma_l1` must be a number >= 0, got "
                             f"{self.gamma_l1!r}.")
        self._set("gamma_l1", float(self.gamma_l1))
        self._set("regrow", float(self.regrow))

    def schedule(self):
        """The `ExplorationSchedule` of the explorations (checks it)."""
        return schedules.ExplorationSchedule(interval=self.interval,
                                             until=self.until)


def _allocator(allocator, target):
    if allocator is None:
        return "knapsack" if target == "latency" else "threshold"
    checks.check_choice("allocator", allocator, ALLOCATORS)
    if allocator == "threshold" and target == "latency":
        raise ValueError(
            "`allocator='threshold'` cannot price a latency target (it "
            "ranks channels without their cost); use `allocator="
            "'knapsack'` or leave `allocator` unset.")
    if allocator == "knapsack" and target == "sparsity":
        raise ValueError(
            "`allocator='knapsack'` needs a cost to fit (`flops`, `params` "
            "or `latency`), not `sparsity`; use `allocator='threshold'` or "
            "leave `allocator` unset.")
    return allocator
