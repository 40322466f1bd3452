"""A defense written only against harness's public protocol (harness.plugin)."""

import torch
import torch.nn.functional as F

from harness.plugin import DefensePlugin


class GaussianNoiseTraining(DefensePlugin):
    """Train on x + N(0, sigma^2) clipped to the eps-ball and [0, 1]; sigma = eps * sigma_ratio."""

    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {"sigma_ratio": {"type": "number", "exclusiveMinimum": 0, "default": 0.5}},
    }

    def __init__(self, eps: float, sigma_ratio: float = 0.5):
        super().__init__(eps)
        self.sigma_ratio = sigma_ratio
        self.calls = 0

    def loss(self, model, x, y):
        self.calls += 1
        noise = (torch.randn_like(x) * self.eps * self.sigma_ratio).clamp(-self.eps, self.eps)
        return F.cross_entropy(model((x + noise).clamp(0, 1)), y)
