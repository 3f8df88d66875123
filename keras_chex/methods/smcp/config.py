"""SMCP's configuration: what `soft_mask_prune` takes, checked once."""

import dataclasses
from typing import ClassVar

from keras_chex.core import checks
from keras_chex.core import config
from keras_chex.methods.smcp import importance as importance_lib
from keras_chex.methods.smcp import schedule as schedule_lib


@dataclasses.dataclass(frozen=True, kw_only=True)
class SmcpConfig(config.MethodConfig):
    """The arguments of `keras_chex.soft_mask_prune`, as the model stores
    them (see that function for their meaning).

    Example:

    ```python
    config = SmcpConfig.from_arguments({"flops": 0.5}, seed=0)
    assert config.round_to == 8 and config.schedule().ramp == 0.6
    ```
    """

    method: ClassVar[str] = "smcp"
    targets: ClassVar[tuple] = ("latency", "flops", "params")

    min_channels: object = 0.05
    round_to: int = 8
    importance: str = "taylor"
    warmup: float = 0.1
    ramp: float = 0.6
    freeze: float = 0.25
    interval_steps: object = None
    pruned_decay: float = 2e-4
    bn_rescale: bool = False

    def check(self):
        importance_lib.check_importance(self.importance)
        for name, value in self.schedule().get_config().items():
            self._set(name, value)
        if not checks.is_number(self.pruned_decay) or self.pruned_decay < 0:
            raise ValueError("`pruned_decay` must be a number >= 0, got "
                             f"{self.pruned_decay!r}.")
        self._set("pruned_decay", float(self.pruned_decay))
        if not isinstance(self.bn_rescale, bool):
            raise ValueError(f"`bn_rescale` must be True or False, got "
                             f"{self.bn_rescale!r}.")

    def schedule(self):
        """The `SoftMaskSchedule` of the recomputations (checks it)."""
        return schedule_lib.SoftMaskSchedule(
            warmup=self.warmup, ramp=self.ramp, freeze=self.freeze,
            interval_steps=self.interval_steps)
