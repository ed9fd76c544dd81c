"""Model, data and loss specs: turn strings such as ``pkg.module:factory`` or ``path/to/file.py:fn`` into
a model, a batch and a loss, for the command line and for experiment runners alike.

Every problem in the user's terms is a :class:`~gradprobe.errors.ConfigError` (the CLI turns it into
exit code 2 with one message).
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gradprobe.errors import ConfigError

__all__ = ["parse_kwargs", "load_model", "parse_shape", "load_data", "LOSSES", "make_loss", "loss_function",
           "synthetic_target", "output_tensor", "at_last_step"]


def _call_args(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def parse_kwargs(items: list[str] | None) -> dict:
    """``["depth=20", "activation='tanh'", "residual=True"]`` → dict (values by ``ast.literal_eval``; bare words are strings)."""
    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise ConfigError(f"keyword argument {item!r} must look like name=value")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def _resolve(spec: str, what: str):
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ConfigError(f"{what} {spec!r} must be 'package.module:name' or 'path/to/file.py:name'")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ConfigError(f"{what} file {path} does not exist")
        name = f"_gradprobe_user_{path.stem}"
        mod_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module
        try:
            mod_spec.loader.exec_module(module)
        except Exception as exc:
            raise ConfigError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ConfigError(f"cannot import {target!r} for {what} {spec!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{target!r} has no attribute {attr!r} (from {what} {spec!r})") from None


def load_model(spec: str, kwargs: dict, state: str | None = None, allow_pickle: bool = False) -> nn.Module:
    """A model from ``module:factory`` / ``file.py:factory`` (called with ``kwargs``), optionally with a
    ``state`` dict loaded safely (``weights_only=True``); or a whole pickled model from a ``.pt`` file,
    only with ``allow_pickle`` (unpickling runs code from the file)."""
    if spec.endswith((".pt", ".pth", ".bin")) and ":" not in spec:
        if not allow_pickle:
            raise ConfigError(
                f"{spec} is a saved file: give the factory that builds the model and load the weights with "
                f"--state {spec}, or pass --allow-pickle to unpickle a whole saved model (this runs code from the file)"
            )
        try:
            model = torch.load(spec, weights_only=False, map_location="cpu")
        except (OSError, RuntimeError) as exc:
            raise ConfigError(f"cannot load {spec}: {exc}") from exc
    else:
        factory = _resolve(spec, "model")
        if not callable(factory):
            raise ConfigError(f"model {spec!r} is not callable")
        try:
            model = factory(**kwargs)
        except Exception as exc:  # the user's factory raised: a usage error naming their function
            raise ConfigError(f"calling {spec}({_call_args(kwargs)}) raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{spec} produced a {type(model).__name__}, not a torch.nn.Module")
    if state is not None:
        try:
            sd = torch.load(state, weights_only=True, map_location="cpu")
        except Exception as exc:  # torch raises several types for a bad file
            raise ConfigError(f"cannot read the state dict {state} safely (weights_only=True): {exc}") from exc
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        try:
            model.load_state_dict(sd)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"the state dict in {state} does not fit {spec}: {exc}") from exc
    return model


def parse_shape(text: str) -> tuple[int, ...]:
    """``"32,64"`` or ``"32x64"`` → ``(32, 64)``."""
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--input {text!r} must be comma-separated sizes such as 32,64") from None
    if not shape or any(s < 1 for s in shape):
        raise ConfigError(f"--input {text!r} must be positive sizes such as 32,64")
    return shape


def load_data(spec: str):
    """``module:fn`` returning ``x`` or ``(x, y)`` (tensors); an exception inside ``fn`` is a
    :class:`~gradprobe.errors.ConfigError` naming it (its traceback is the error's ``__cause__``)."""
    fn = _resolve(spec, "data")
    try:
        data = fn() if callable(fn) else fn
    except Exception as exc:
        raise ConfigError(f"calling the data function {spec}() raised {type(exc).__name__}: {exc}") from exc
    if isinstance(data, torch.Tensor):
        return data, None
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return data[0], data[1]
    raise ConfigError(f"data {spec!r} must return a tensor x or a pair (x, y) of tensors; got {type(data).__name__}")


def _first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict):
        for v in out.values():
            if isinstance(v, torch.Tensor):
                return v
    raise ConfigError(f"the model returned {type(out).__name__}; doctor needs a tensor (or a tuple starting with one)")


LOSSES = ("mean_square", "cross_entropy", "mse")


def at_last_step(t: torch.Tensor, time_dim: int, steps: int) -> torch.Tensor:
    """``t`` at its last time step, ``t.select(time_dim, -1)``, when ``t`` has a time axis of length
    ``steps`` at ``time_dim`` and another axis besides it; otherwise ``t`` itself."""
    if t.dim() >= 2 and t.dim() > time_dim and t.shape[time_dim] == steps:
        return t.select(time_dim, -1)
    return t


def output_tensor(out, *, time_dim: int | None = None, steps: int | None = None) -> torch.Tensor:
    """The tensor a loss reads from a model output (the first tensor of a tuple/dict); with ``time_dim``,
    only its last time step (:func:`at_last_step`)."""
    y = _first_tensor(out)
    return y if time_dim is None else at_last_step(y, time_dim, steps)


def loss_function(name: str, *, time_dim: int | None = None, steps: int | None = None) -> Callable:
    """``loss(output, target) -> scalar`` for one of :data:`LOSSES`:

    * ``mean_square``: mean(y²) (the target is ignored);
    * ``cross_entropy``: class logits in dim 1 (or the last dim for 3-D outputs) vs integer ``target``;
    * ``mse``: mean squared error vs ``target``.

    With ``time_dim``, the loss reads only the output's last time step (``steps`` long on that axis):
    the long-range setting of Pascanu, Mikolov & Bengio (2013), where the gradient of a loss at the end
    of the sequence must travel back through every step.
    """
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; choose one of {LOSSES}")

    def loss(out, target):
        y = output_tensor(out, time_dim=time_dim, steps=steps)
        if name == "mean_square":  # in float32 at least (half-precision outputs are upcast)
            return (y if y.dtype == torch.float64 else y.float()).pow(2).mean()
        if name == "cross_entropy":
            if y.dim() == 3:
                return F.cross_entropy(y.reshape(-1, y.shape[-1]), target.reshape(-1))
            return F.cross_entropy(y, target)
        return F.mse_loss(y, target)

    return loss


def synthetic_target(name: str, output: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
    """A random target for the (loss-read) ``output``: uniform class labels for ``cross_entropy`` (logits
    in dim 1, or the last dim of a 3-D output), N(0, 1) for ``mse``, ``None`` for ``mean_square``.
    Drawn on the CPU from ``generator`` (reproducible on any device), then moved to the output's device."""
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; choose one of {LOSSES}")
    if name == "mean_square":
        return None
    if name == "cross_entropy":
        if output.dim() < 2:
            raise ConfigError(f"cross_entropy needs class logits of shape (batch, classes, ...); the model "
                              f"returned shape {tuple(output.shape)}")
        logits = output.reshape(-1, output.shape[-1]) if output.dim() == 3 else output
        t = torch.randint(0, logits.shape[1], (logits.shape[0],) + tuple(logits.shape[2:]), generator=generator)
        return (t.reshape(output.shape[:-1]) if output.dim() == 3 else t).to(output.device)
    return torch.randn(output.shape, generator=generator, dtype=output.dtype).to(output.device)


def make_loss(name: str, target: torch.Tensor | None, generator: torch.Generator) -> Callable:
    """A scalar loss of the model output alone, ``loss(output)``: :func:`loss_function` against ``target``,
    or against a random :func:`synthetic_target` drawn at the first call and reused after."""
    fn = loss_function(name)
    cache: dict = {}

    def loss(out):
        if "t" not in cache:
            cache["t"] = target if target is not None else synthetic_target(name, _first_tensor(out), generator)
        return fn(out, cache["t"])

    return loss
