"""Classifiers this project did not write: torchvision and timm architectures, torch.export and
TorchScript archives, behind the interface the distiller uses.

Every classifier of lrra.models answers ``model(x, return_features=True)`` with its logits and
its penultimate features (the generator's activation term reads the teacher's). Foreign models
get the same interface here:

* ``nn.Module`` networks (torchvision, timm, a trusted pickled module): a forward hook on the
  input of the last ``nn.Linear`` gives the features.
* torch.export archives: the graph's last ``aten.linear`` call gives them, through a small module
  inserted into the graph that records its input. An archive exported for one fixed batch size
  is run in chunks of that size. The input of every batch-norm call is tapped the same way, with
  the call's running statistics beside it, so DeepInversion's prior (lrra/batchnorm_prior.py)
  works for exported teachers as for modules (archives with a free batch dimension only: a chunk
  padded to a fixed batch would add zeros to the statistics).
* TorchScript archives expose no reliable hook: the features are None, and the activation term
  is switched off (the run says so).
"""

from __future__ import annotations

import importlib.util
import io

import torch
from torch import nn

TORCHVISION, TIMM = "torchvision:", "timm:"
PREFIXES = (TORCHVISION, TIMM)


class ExternalArchitectureError(ValueError):
    """An architecture name of the form torchvision:NAME or timm:NAME that cannot be built."""


def check_external_name(arch: str) -> None:
    """Raise ExternalArchitectureError unless ``arch`` names a buildable torchvision or timm model."""
    library, _, name = arch.partition(":")
    if not name:
        raise ExternalArchitectureError(f"{arch!r} names no model; expected {library}:NAME")
    if arch.startswith(TIMM):
        if importlib.util.find_spec("timm") is None:
            raise ExternalArchitectureError(f"{arch!r} needs the timm package, which is not installed: "
                                            "pip install 'lrra[timm]' (or pip install timm)")
        import timm

        if name not in timm.list_models():
            raise ExternalArchitectureError(f"timm has no model {name!r} (timm.list_models() lists them)")
        return
    import torchvision.models

    if name not in torchvision.models.list_models():
        raise ExternalArchitectureError(f"torchvision has no model {name!r}; e.g. resnet18, mobilenet_v3_small, "
                                        "efficientnet_b0 (torchvision.models.list_models() lists them)")


def build_external(arch: str, num_classes: int, channels: int) -> TappedClassifier:
    """A randomly initialised torchvision or timm network with ``num_classes`` outputs."""
    check_external_name(arch)
    library, _, name = arch.partition(":")
    if library == "timm":
        import timm

        net = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=channels)
    else:
        import torchvision.models

        # torchvision's networks take 3 channels; a grey dataset is repeated to 3 (set channels=3).
        net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    return TappedClassifier(net)


def last_linear(module: nn.Module) -> nn.Linear | None:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


class TappedClassifier(nn.Module):
    """An ``nn.Module`` classifier whose penultimate features are read off its last linear layer."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self._features: torch.Tensor | None = None
        head = last_linear(net)
        self.has_features = head is not None
        if head is not None:
            head.register_forward_hook(self._record)

    def _record(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self._features = inputs[0]

    def forward(self, x: torch.Tensor, return_features: bool = False):
        logits = self.net(x)
        if not return_features:
            return logits
        features, self._features = self._features, None
        return logits, (torch.flatten(features, 1) if features is not None else None)


class _FeatureTap(nn.Module):
    """Inserted into an exported graph: passes its input on and keeps it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x)
        return x


class BatchNormInputTap(nn.Module):
    """Inserted before a batch-norm call of an exported graph: passes the call's input on, and holds
    the call's running statistics, so that the BatchNorm prior can hook it as it hooks a layer."""

    def __init__(self, running_mean: torch.Tensor, running_var: torch.Tensor) -> None:
        super().__init__()
        self.running_mean, self.running_var = running_mean, running_var

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


# Batch-norm calls in exported graphs (eval-mode exports may show either); both take
# (input, weight, bias, running_mean, running_var, ...).
_BATCH_NORM_CALLS = (torch.ops.aten.batch_norm.default, torch.ops.aten._native_batch_norm_legit_no_training.default)


def batch_norm_calls(graph_module: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The graph's batch-norm calls that read running statistics held by the module."""
    return [node for node in graph_module.graph.nodes
            if node.op == "call_function" and node.target in _BATCH_NORM_CALLS
            and all(isinstance(arg, torch.fx.Node) and arg.op == "get_attr" for arg in node.args[3:5])]


def tap_batch_norm_inputs(graph_module: torch.fx.GraphModule) -> None:
    """Put a BatchNormInputTap before each batch-norm call that has running statistics."""
    for index, call in enumerate(batch_norm_calls(graph_module)):
        mean, var = (graph_module.get_buffer(arg.target) for arg in call.args[3:5])
        name = f"lrra_batch_norm_tap_{index}"
        graph_module.add_submodule(name, BatchNormInputTap(mean, var))
        source = call.args[0]
        with graph_module.graph.inserting_before(call):
            tapped = graph_module.graph.call_module(name, (source,))
        call.replace_input_with(source, tapped)


class CompiledClassifier(nn.Module):
    """A torch.export or TorchScript classifier; ``batch`` is the one batch size it accepts (None: any).

    ``untapped_batch_norms``: batch-norm layers left without a prior tap, because the archive runs
    on padded chunks of its one batch size, whose statistics are not the batch's."""

    def __init__(self, net: nn.Module, batch: int | None, tap: _FeatureTap | None,
                 untapped_batch_norms: int = 0) -> None:
        super().__init__()
        self.net, self.batch, self.tap = net, batch, tap
        self.has_features = tap is not None
        self.untapped_batch_norms = untapped_batch_norms

    def forward(self, x: torch.Tensor, return_features: bool = False):
        if self.tap is not None:
            self.tap.seen.clear()
        if self.batch is None or len(x) == self.batch:
            logits = self.net(x)
        else:
            logits = torch.cat([self._padded(chunk) for chunk in x.split(self.batch)])
        if not return_features:
            return logits
        if self.tap is None:
            return logits, None
        features = torch.cat([torch.flatten(f, 1) for f in self.tap.seen])[: len(x)]
        return logits, features

    def _padded(self, chunk: torch.Tensor) -> torch.Tensor:
        """The net's output for a chunk shorter than its batch, padded with zeros and trimmed back."""
        missing = self.batch - len(chunk)
        if missing:
            chunk = torch.cat([chunk, chunk.new_zeros(missing, *chunk.shape[1:])])
        return self.net(chunk)[: self.batch - missing]

    def train(self, mode: bool = True) -> CompiledClassifier:
        # An exported graph is frozen in the mode it was exported in (GraphModule.train raises for
        # torch.export's); teachers only ever run in eval mode anyway.
        return self


def load_exported(data: bytes) -> CompiledClassifier:
    """A torch.export archive's module, with its features tapped where the graph shows them."""
    program = torch.export.load(io.BytesIO(data))
    graph_module = program.module()
    inputs = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
    shape = inputs[0].meta.get("val").shape if inputs and inputs[0].meta.get("val") is not None else None
    batch = int(shape[0]) if shape is not None and not isinstance(shape[0], torch.SymInt) else None
    linears = [n for n in graph_module.graph.nodes
               if n.op == "call_function" and n.target == torch.ops.aten.linear.default]
    tap = None
    if linears:
        tap = _FeatureTap()
        graph_module.add_submodule("lrra_feature_tap", tap)
        features = linears[-1].args[0]
        with graph_module.graph.inserting_after(features):
            tapped = graph_module.graph.call_module("lrra_feature_tap", (features,))
        linears[-1].replace_input_with(features, tapped)
    untapped = 0
    if batch is None:
        tap_batch_norm_inputs(graph_module)
    else:
        untapped = len(batch_norm_calls(graph_module))
    graph_module.recompile()
    return CompiledClassifier(graph_module, batch, tap, untapped)


def load_torchscript(data: bytes) -> CompiledClassifier:
    return CompiledClassifier(torch.jit.load(io.BytesIO(data), map_location="cpu"), None, None)
