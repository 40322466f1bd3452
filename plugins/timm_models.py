"""Model `timm` (and its variants `timm:<arch>`): any timm architecture, randomly initialized, with the harness's
spectral-norm option, so the paper's protocol runs on backbones it never tried.

Name it either way in a spec:
    {"name": "timm:resnet18"}                              (the registry's variant mechanism, harness.registry)
    {"name": "timm", "options": {"arch": "resnet18"}}
`timm:<arch>` is checked against timm's model list when the spec is validated. `kwargs` go to
`timm.create_model` unchanged (e.g. {"img_size": 32} for a ViT on CIFAR); validate builds the model once on
PyTorch's meta device (no memory, no compute) to refuse an unknown arch, kwargs timm rejects and a model over
PARAMETER_CAP parameters, so that what validate accepts, run can build. Inputs are images in [0, 1]; no pretrained
weights are loaded (nothing is downloaded), so no input normalization is added.
"""

from __future__ import annotations

import copy
import difflib

from torch import nn

from harness.errors import BadInput
from harness.plugin import SPECTRAL_NORM_OPTION, ModelPlugin


def check_arch(arch: str) -> None:
    import timm

    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise BadInput(f"timm has no architecture {arch!r}.{hint}",
                       fix="pick a name from timm.list_models() (python -c \"import timm; print(timm.list_models('*resnet*'))\")")


PARAMETER_CAP = 2 * 10**9  # what validate accepts: fp32 weights, gradients and momentum of 2e9 take 24 GB


class TimmModel(ModelPlugin):
    """Any timm architecture by name (`timm:<arch>`), randomly initialized; optional spectral norm."""

    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["arch"],
        "properties": {
            "arch": {"description": "A timm model name (timm.list_models()).", "type": "string", "minLength": 1},
            "spectral_norm": SPECTRAL_NORM_OPTION,
            "kwargs": {"description": "Extra keyword arguments for timm.create_model.", "type": "object",
                       "default": {}},
        },
    }

    def __init__(self, arch: str, spectral_norm: bool = True, kwargs: dict | None = None):
        super().__init__(spectral_norm)
        self.arch, self.kwargs = arch, dict(kwargs or {})

    @classmethod
    def check_options(cls, options: dict) -> list[str]:
        """The model built on the meta device with 10 classes and 3 input channels (the dataset is not known here;
        the build at run time gives timm the dataset's): timm's own refusal of the arch or of `kwargs`, and the
        parameter count against PARAMETER_CAP."""
        import torch

        plugin = cls(**options)
        reserved = sorted(set(plugin.kwargs) & {"num_classes", "in_chans", "pretrained"})
        if reserved:
            return [f"kwargs {', '.join(reserved)}: the harness sets {'these' if len(reserved) > 1 else 'this'} "
                    "itself (classes and channels from the dataset; never pretrained weights); remove "
                    f"{'them' if len(reserved) > 1 else 'it'} from \"kwargs\""]
        try:
            with torch.device("meta"):
                model = plugin._create(10, 3)
        except BadInput as exc:
            return [f"{exc.message}; {exc.fix}"]
        except Exception as exc:  # timm's checks of its kwargs raise what they like (AssertionError, ValueError)
            return [f"timm.create_model({plugin.arch!r}, **kwargs) fails: {type(exc).__name__}: {exc}; correct the "
                    "model's \"kwargs\" option"]
        count = sum(p.numel() for p in model.parameters())
        if count > PARAMETER_CAP:
            return [f"timm's {plugin.arch} with these kwargs has {count:,} parameters, over the {PARAMETER_CAP:,} "
                    "this harness trains; use smaller kwargs (widths, depths, image size)"]
        return []

    def _create(self, num_classes: int, in_chans: int) -> nn.Module:
        import timm

        check_arch(self.arch)
        try:
            return timm.create_model(self.arch, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                                     **self.kwargs)
        except TypeError as exc:
            raise BadInput(f"timm.create_model({self.arch!r}) rejected the options: {exc}",
                           fix="correct the model's \"kwargs\" option") from exc

    @classmethod
    def variant(cls, arch: str) -> type["TimmModel"]:
        """The plugin for `timm:<arch>`: this class with `arch` fixed (and no longer an option)."""
        check_arch(arch)
        schema = copy.deepcopy(cls.options_schema)
        del schema["properties"]["arch"]
        schema.pop("required")

        def __init__(self, spectral_norm: bool = True, kwargs: dict | None = None):
            cls.__init__(self, arch, spectral_norm, kwargs)

        return type(f"TimmModel_{arch}", (cls,), {"options_schema": schema, "__init__": __init__,
                                                  "__doc__": f"timm's {arch}, randomly initialized."})

    def build(self, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
        return self.normalize(self._create(num_classes, input_shape[0]))
