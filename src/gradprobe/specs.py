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

__all__ = ["parse_kwargs", "load_model", "parse_shape", "load_data", "LOSSES", "make_loss"]


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
        except TypeError as exc:
            raise ConfigError(f"calling {spec} with {kwargs} failed: {exc}") from exc
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
    """``module:fn`` returning ``x`` or ``(x, y)`` (tensors)."""
    fn = _resolve(spec, "data")
    data = fn() if callable(fn) else fn
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


def make_loss(name: str, target: torch.Tensor | None, generator: torch.Generator) -> Callable:
    """A scalar loss of the model output.

    * ``mean_square``: mean(y²) (no target needed);
    * ``cross_entropy``: class logits in dim 1 (or the last dim for 3-D outputs) vs ``target`` or random labels;
    * ``mse``: mean squared error vs ``target`` or a fixed random N(0, 1) target.
    """
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; choose one of {LOSSES}")
    cache: dict = {}

    def loss(out):
        y = _first_tensor(out)
        if name == "mean_square":
            return y.float().pow(2).mean()
        if name == "cross_entropy":
            logits = y.reshape(-1, y.shape[-1]) if y.dim() == 3 else y
            if "t" not in cache:
                cache["t"] = target if target is not None else torch.randint(
                    0, logits.shape[1], (logits.shape[0],) + tuple(logits.shape[2:]), generator=generator)
            return F.cross_entropy(logits, cache["t"].reshape(-1) if y.dim() == 3 else cache["t"])
        if "t" not in cache:
            cache["t"] = target if target is not None else torch.randn(y.shape, generator=generator, dtype=y.dtype)
        return F.mse_loss(y, cache["t"])

    return loss
