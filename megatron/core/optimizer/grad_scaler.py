"""Loss scaling for fp16 (Megatron's dynamic scaler), driven by the global gradient norm.

A step whose gradient norm is not finite is skipped on every rank; the norm is already reduced
over all ranks, so ranks never disagree about skipping.
"""

from __future__ import annotations


class LossScaler:
    """Static when `static_scale` is given; otherwise halves after `hysteresis` overflows and
    doubles after `growth_interval` good steps, never below `min_scale`."""

    def __init__(self, initial_scale: float, min_scale: float = 1.0, growth_interval: int = 1000,
                 hysteresis: int = 2, static_scale: float | None = None):
        self.dynamic = static_scale is None
        self.scale = float(initial_scale if self.dynamic else static_scale)
        self.min_scale = min_scale
        self.growth_interval = growth_interval
        self.hysteresis = hysteresis
        self._growth_tracker = 0
        self._hysteresis_tracker = hysteresis

    def update(self, found_inf: bool) -> None:
        if not self.dynamic:
            return
        if found_inf:
            self._growth_tracker = 0
            self._hysteresis_tracker -= 1
            if self._hysteresis_tracker <= 0:
                self.scale = max(self.scale * 0.5, self.min_scale)
        else:
            self._growth_tracker += 1
            if self._growth_tracker == self.growth_interval:
                self._growth_tracker = 0
                self._hysteresis_tracker = self.hysteresis
                self.scale *= 2.0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_tracker": self._growth_tracker,
                "hysteresis_tracker": self._hysteresis_tracker}

    def load_state_dict(self, state: dict) -> None:
        self.scale = state["scale"]
        self._growth_tracker = state["growth_tracker"]
        self._hysteresis_tracker = state["hysteresis_tracker"]
