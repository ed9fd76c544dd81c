"""``DeepMLP``: a deep fully-connected network with every activation / init / residual / norm choice.

Plain:     h⁰ = φ(N(W⁰x)),  hˡ = φ(N(Wˡhˡ⁻¹)) for l = 1…depth,  y = W_out h^depth
Residual:  hˡ = hˡ⁻¹ + s · Vˡ φ(N(Wˡ hˡ⁻¹))  (two linear layers per block, branch scale ``s``)

``N`` is the optional normalisation (BatchNorm1d or LayerNorm) and φ the activation. Works without
gradprobe: a plain ``nn.Module``.

Each plain block is an ``nn.Sequential(linear, norm, act)`` (children named so), so the generic
architecture transforms see it: ``gradprobe.remedies.add_residual(DeepMLP(...))`` turns every block
into ``x + s·φ(N(W x))``, and ``insert_normalization`` / ``swap_activations`` reach inside. A residual
block (``residual=True``) is a :class:`ResidualBlock`.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from gradprobe.errors import ConfigError
from gradprobe.functional.init import init_weight_

__all__ = ["DeepMLP", "ResidualBlock", "ACTIVATIONS", "INITS", "NORMS", "CRITICAL_SIGMA_W2"]

ACTIVATIONS = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.01),
    "prelu": nn.PReLU,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "gelu": nn.GELU,
    "linear": nn.Identity,
}
INITS = ("standard", "xavier", "he", "lecun", "orthogonal", "gaussian", "critical", "torch")
# σ_w² with χ₁ = σ_w² E[φ'(h)²] = 1 at σ_b = 0, where a closed form exists (Poole et al. 2016;
# Schoenholz et al. 2017): linear 1; ReLU 2 (He et al. 2015); leaky ReLU with slope a 2/(1 + a²);
# tanh 1 (the fixed point is q* = 0, where tanh' = 1; approached only slowly, ~1/depth). PReLU uses
# its initial slope 0.25. SELU is absent on purpose: its LeCun init (σ_w² = 1) is self-normalising
# (q* = 1) but has χ₁ = E[selu'(z)²] ≈ 1.07, not 1. Other activations need gradprobe.theory's quadrature.
CRITICAL_SIGMA_W2 = {
    "linear": 1.0,
    "relu": 2.0,
    "leaky_relu": 2.0 / (1.0 + 0.01**2),
    "prelu": 2.0 / (1.0 + 0.25**2),
    "tanh": 1.0,
}
NORMS = ("none", "batch", "layer")


class ResidualBlock(nn.Module):
    """``h + s · proj(act(norm(linear(h))))``: DeepMLP's residual block (He et al. 2016, two linear layers)."""

    def __init__(self, linear: nn.Linear, norm: nn.Module, act: nn.Module, proj: nn.Linear, scale: float):
        super().__init__()
        self.linear, self.norm, self.act, self.proj = linear, norm, act, proj
        self.scale = float(scale)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.scale * self.proj(self.act(self.norm(self.linear(h))))

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}"


class DeepMLP(nn.Module):
    """Deep MLP for depth experiments (Glorot & Bengio 2010; He et al. 2015).

    Args:
        in_features, out_features: input and output sizes.
        width: hidden width; depth: number of hidden ``width×width`` layers (or residual blocks)
            after the input projection.
        activation: one of ``ACTIVATIONS``; init: one of ``INITS`` ("torch" keeps PyTorch's default;
            "critical" draws W ~ N(0, σ_w²/fan_in) with the closed-form critical σ_w² of
            ``CRITICAL_SIGMA_W2`` and zero biases, for the activations listed there).
        residual: use residual blocks; residual_scale: branch multiplier ``s`` (e.g. ``depth**-0.5``).
        norm: "none", "batch" or "layer"; sigma_w2 / sigma_b2: for ``init="gaussian"`` (biases
            ~ N(0, σ_b²); every other init zeroes the biases).

    Input ``(B, in_features)``, output ``(B, out_features)``.

    >>> net = DeepMLP(64, 10, width=32, depth=4, activation="sigmoid", init="standard")
    >>> net(torch.randn(8, 64)).shape
    torch.Size([8, 10])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        width: int = 128,
        depth: int = 10,
        activation: str = "relu",
        init: str = "he",
        residual: bool = False,
        residual_scale: float = 1.0,
        norm: str = "none",
        sigma_w2: float | None = None,
        sigma_b2: float = 0.0,
        bias: bool = True,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        if init not in INITS:
            raise ConfigError(f"unknown init {init!r}; choose one of {INITS}")
        if norm not in NORMS:
            raise ConfigError(f"unknown norm {norm!r}; choose one of {NORMS}")
        if init == "critical":
            if activation not in CRITICAL_SIGMA_W2:
                raise ConfigError(
                    f"init='critical' has no closed form for activation {activation!r} (only for "
                    f"{sorted(CRITICAL_SIGMA_W2)}); pass init='gaussian', "
                    f"sigma_w2=gradprobe.theory.critical_sigma_w2({activation!r}) instead"
                )
            if sigma_b2 != 0.0:
                raise ConfigError(
                    f"init='critical' uses the critical point at sigma_b2 = 0; got sigma_b2={sigma_b2}. "
                    "For biased critical inits pass init='gaussian' with sigma_w2 from gradprobe.theory"
                )
            sigma_w2 = CRITICAL_SIGMA_W2[activation]
        scheme = "gaussian" if init == "critical" else init
        if depth < 0 or width < 1:
            raise ConfigError(f"need depth >= 0 and width >= 1; got depth={depth}, width={width}")
        self.config = dict(
            in_features=in_features, out_features=out_features, width=width, depth=depth,
            activation=activation, init=init, residual=residual, residual_scale=residual_scale,
            norm=norm, sigma_w2=sigma_w2, sigma_b2=sigma_b2, bias=bias,
        )
        self.residual = residual
        self.residual_scale = float(residual_scale)
        act = ACTIVATIONS[activation]

        def normalization() -> nn.Module:
            return {"none": nn.Identity, "batch": lambda: nn.BatchNorm1d(width), "layer": lambda: nn.LayerNorm(width)}[norm]()

        self.input = nn.Linear(in_features, width, bias=bias)
        self.input_norm = normalization()
        self.input_act = act()
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            parts = OrderedDict(linear=nn.Linear(width, width, bias=bias), norm=normalization(), act=act())
            if residual:
                self.blocks.append(ResidualBlock(*parts.values(), nn.Linear(width, width, bias=bias), residual_scale))
            else:
                self.blocks.append(nn.Sequential(parts))
        self.output = nn.Linear(width, out_features, bias=bias)
        if init != "torch":
            gain = 1.0
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    init_weight_(m.weight, scheme, gain=gain, sigma_w2=sigma_w2, generator=generator)
                    if m.bias is not None:
                        if init == "gaussian" and sigma_b2 > 0:
                            with torch.no_grad():
                                m.bias.normal_(0.0, sigma_b2**0.5, generator=generator)
                        else:
                            nn.init.zeros_(m.bias)

    @property
    def linears(self) -> list[nn.Linear]:
        """Every ``nn.Linear`` in forward order (also after a transform rewrote the blocks)."""
        return [m for m in self.modules() if isinstance(m, nn.Linear)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.input_act(self.input_norm(self.input(x)))  # (B, width)
        for block in self.blocks:
            h = block(h)  # (B, width)
        return self.output(h)  # (B, out_features)
