"""Reward functions: a registry, output validation, and weighted combinations.

A reward function has the signature

    fn(images, prompts, metadata) -> (rewards, info)

where `images` is what the model's `decode` returns (float NCHW in [0, 1]; for
the 2-D toy, points (N, 2)), `prompts` is a sequence of N strings, `metadata`
is an optional dict (may be None), `rewards` is a float tensor of shape (N,) on
the images' device and `info` is a dict of extra values for logging (e.g. the
classifier's accuracy).

Rewards are wrapped in :class:`Reward`, whose `__call__` checks the output
(shape (N,), float, finite) and raises :class:`RewardError` naming the reward
otherwise, so a broken reward fails loudly at its source instead of turning
into NaN losses three modules later.

Building rewards (:func:`build_reward`) from a *spec*:

- a registered name: ``'classifier'`` (see :func:`list_rewards`);
- a call with keyword arguments for the factory:
  ``'aesthetic(path=/models/clip-vit-l-14, head=/models/aesthetic.safetensors)'``.
  Values are read as YAML scalars (``3`` an int, ``0.5`` a float, ``true`` a bool,
  anything else text; quote a value to keep it text or to hold ``,`` or ``)``); a
  leading ``~`` is expanded. Unknown keyword names are an error listing the accepted
  ones. ``build_reward('aesthetic', path=..., head=...)`` is the same (the
  reward's name is the bare ``'aesthetic'``);
- ``'package.module:function'`` for your own code. The function is used
  **directly as the reward** if its first parameter is named ``images``
  (signature ``fn(images, prompts, metadata)``); otherwise it is a **factory**,
  called as ``factory(device=device, **kwargs)`` (``device`` is only passed
  if the factory accepts it) and returning the reward function. Mark the
  reward function as differentiable with a function attribute
  ``fn.differentiable = True`` (default False); an optional ``fn.description``
  string (else the docstring's first line) describes it;
- a weighted sum: a dict ``{spec: weight, ...}`` or a string
  ``'1.0*classifier+0.1*ink'`` (terms ``[sign][weight*]spec`` joined by ``+``
  or ``-``; a term may be a call: ``'1.0*clip-score(path=/x)+0.1*brightness'``;
  a registered name holding ``-``, like ``clip-score``, is read whole). The
  sum is differentiable only if every part is; its `info` holds each part's
  raw (unweighted, detached) rewards under the part's name and each part's own
  info entries as ``'<part>/<key>'``;
- an existing :class:`Reward` (returned unchanged).

Adding a built-in reward::

    @register('my_reward', description='what it measures, its scale', differentiable=True)
    def _my_reward(device='cpu', **kwargs):
        def fn(images, prompts, metadata=None):
            return images.mean(dim=(1, 2, 3)), {}
        return fn
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from ..registry import closest, did_you_mean, import_all

__all__ = [
    "Reward",
    "RewardError",
    "register",
    "build_reward",
    "list_rewards",
    "registered_names",
]


class RewardError(ValueError):
    """A reward function returned something unusable (wrong shape, NaN/inf, ...)."""


@dataclass
class Reward:
    name: str  # e.g. 'classifier' or '1.0*classifier+0.1*ink'
    fn: Callable  # fn(images, prompts, metadata) -> (rewards (N,), info dict)
    differentiable: bool
    description: str = ""
    parts: tuple = ()  # a weighted sum's (part name, weight) pairs, its parts' raw rewards in `info`; () otherwise

    def __call__(self, images, prompts=None, metadata=None) -> tuple[torch.Tensor, dict]:
        """Evaluate the reward and validate its output; see the module docstring.

        `prompts` may be None for prompt-free rewards (treated as N empty strings).
        """
        n = _batch_size(images, self.name)
        if prompts is None:
            prompts = [""] * n
        elif isinstance(prompts, str):
            raise RewardError(
                f"reward {self.name!r}: prompts must be a sequence of {n} strings, not a single "
                f"string {prompts!r} (use [prompt] * n)"
            )
        try:
            n_prompts = len(prompts)
        except TypeError:
            raise RewardError(
                f"reward {self.name!r}: prompts must be a sequence of {n} strings, "
                f"got {type(prompts).__name__}"
            ) from None
        if n_prompts != n:
            raise RewardError(
                f"reward {self.name!r} got {n} images but {n_prompts} prompts; "
                "pass exactly one prompt per image"
            )
        out = self.fn(images, prompts, metadata)
        rewards, info = _split_output(out, self.name)
        rewards = _validate_rewards(rewards, images, n, self.name)
        return rewards, info


# ---------------------------------------------------------------- registry

@dataclass
class _Entry:
    factory: Callable
    description: str
    differentiable: bool


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, description: str, differentiable: bool):
    """Decorator registering `factory(device='cpu', **kwargs) -> fn` under `name`."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(?:-[A-Za-z0-9_]+)*", name):
        raise ValueError(f"reward name {name!r} must be letters, digits and underscores (hyphens between them)")

    def deco(factory: Callable) -> Callable:
        old = _REGISTRY.get(name)
        if old is not None and _qualname(old.factory) != _qualname(factory):
            raise ValueError(
                f"reward name {name!r} is already registered by {_qualname(old.factory)}; "
                "choose another name"
            )
        _REGISTRY[name] = _Entry(factory, description, bool(differentiable))
        return factory

    return deco


def _qualname(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _discover() -> None:
    import_all(__name__, __path__)


def registered_names() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def list_rewards() -> list[tuple[str, str, bool]]:
    _discover()
    """(name, description, differentiable) of every registered reward, sorted by name."""
    return [(n, _REGISTRY[n].description, _REGISTRY[n].differentiable) for n in sorted(_REGISTRY)]


# ---------------------------------------------------------------- building

_NUM = r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_PLAIN = r"[A-Za-z_][\w.]*(?::[A-Za-z_][\w.]*)?"
_ARGS = r"""\((?:"[^"]*"|'[^']*'|[^()"'])*\)"""  # (key=value, ...); quoted values may hold anything
_KWARG = re.compile(r"""\s*([A-Za-z_]\w*)\s*=\s*("[^"]*"|'[^']*'|[^,"']*?)\s*(?:,|$)""")


def _name() -> str:
    """A spec's name: a registered name holding '-' (read whole, longest first), else an identifier or
    module:function."""
    hyphenated = sorted((n for n in _REGISTRY if "-" in n), key=len, reverse=True)
    return "(?:" + "|".join([re.escape(n) + r"(?![\w.])" for n in hyphenated] + [_PLAIN]) + ")"


def _parse_weighted(spec: str) -> dict[str, float] | None:
    """'1.0*classifier+0.1*ink' -> {'classifier': 1.0, 'ink': 0.1}; None for a plain spec or call."""
    name = _name()
    if re.fullmatch(rf"\s*{name}\s*(?:{_ARGS})?\s*", spec):
        return None
    term = re.compile(rf"\s*([+-]?)\s*(?:({_NUM})\s*\*\s*)?({name}\s*(?:{_ARGS})?)\s*")
    terms: dict[str, float] = {}
    pos = 0
    first = True
    while pos < len(spec):
        m = term.match(spec, pos)
        if m is None or m.end() == pos or (not first and not m.group(1)):
            raise ValueError(
                f"cannot parse reward spec {spec!r} near position {pos} ({spec[pos:pos + 20]!r}); "
                "expected terms like '1.0*classifier+0.1*ink' or '2*classifier-0.5*ink'"
            )
        sign = -1.0 if m.group(1) == "-" else 1.0
        weight = sign * (float(m.group(2)) if m.group(2) else 1.0)
        name = m.group(3)
        if name in terms:
            raise ValueError(f"reward spec {spec!r} names {name!r} twice; give each part once")
        terms[name] = weight
        pos = m.end()
        first = False
    return terms


def _parse_call(spec: str) -> tuple[str, dict]:
    """'aesthetic(path=/x, head=/y.safetensors)' -> ('aesthetic', {...}); a spec without '(' -> (spec, {})."""
    if "(" not in spec:
        return spec, {}
    m = re.fullmatch(r"\s*([^()\s]+)\s*\((.*)\)\s*", spec, re.S)
    if m is None:
        raise ValueError(f"cannot parse reward spec {spec!r}; expected name(key=value, ...), "
                         "e.g. 'aesthetic(path=/models/clip, head=/models/aesthetic.safetensors)'")
    name, inner = m.group(1), m.group(2).strip()
    kwargs: dict = {}
    pos = 0
    while pos < len(inner):
        km = _KWARG.match(inner, pos)
        if km is None or km.end() == pos:
            raise ValueError(f"cannot parse the arguments of reward spec {spec!r} near {inner[pos:pos + 20]!r}; "
                             "expected key=value pairs separated by commas (quote a value holding ',' or ')')")
        if km.group(1) in kwargs:
            raise ValueError(f"reward spec {spec!r} gives {km.group(1)!r} twice")
        kwargs[km.group(1)] = _scalar(km.group(2))
        pos = km.end()
    return name, kwargs


def _scalar(raw: str):
    """A call argument: a YAML scalar (int, float, bool, null) or text; quotes keep text; '~' expanded."""
    import os

    import yaml

    if raw[:1] in ("'", '"'):
        value = raw[1:-1]
    else:
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        if value is not None and not isinstance(value, (str, int, float, bool)):
            value = raw  # e.g. a date or 'a: b': keep the text
        if isinstance(value, str) and re.fullmatch(rf"[+-]?{_NUM}", value):
            value = float(value)  # YAML 1.1 reads 1e-4 as text
    return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value


def _check_kwargs(name: str, factory, kwargs: dict) -> None:
    """Unknown keyword names fail here, naming the reward and the keywords it accepts."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return
    accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "device"]
    bad = sorted(set(kwargs) - set(accepted))
    if bad:
        close = [c for c in (closest(b, accepted) for b in bad) if c]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"reward {name!r} has no keyword argument {', '.join(bad)}{hint}; it accepts "
                         f"{', '.join(accepted) or 'none'}" + (" (the device is the run's)" if "device" in bad else ""))


def build_reward(spec, device="cpu", **kwargs) -> Reward:
    """Build a :class:`Reward` from a name, 'module:function', dict or weighted-sum string.

    Extra keyword arguments go to the factory (e.g. ``build_reward('quadratic',
    target=(1, 1))``); they are not allowed for weighted sums.
    """
    if isinstance(spec, Reward):
        if kwargs:
            raise ValueError("keyword arguments cannot be applied to an already built Reward")
        return spec
    _discover()
    if isinstance(spec, Mapping):
        if kwargs:
            raise ValueError(
                f"keyword arguments {sorted(kwargs)} cannot be passed to a weighted sum of rewards; "
                "build the parts with build_reward(name, **kwargs) and combine them in a dict"
            )
        return _build_sum(dict(spec), device)
    if not isinstance(spec, str):
        raise TypeError(
            f"reward spec must be a name, 'module:function', a dict {{spec: weight}} or a Reward, "
            f"got {type(spec).__name__}"
        )
    spec = spec.strip()
    weighted = _parse_weighted(spec)
    if weighted is not None:
        if kwargs:
            raise ValueError(
                f"keyword arguments {sorted(kwargs)} cannot be passed to the weighted sum {spec!r}"
            )
        return _build_sum(weighted, device)
    spec, call_kwargs = _parse_call(spec)
    if set(call_kwargs) & set(kwargs):
        raise ValueError(f"reward {spec!r}: {sorted(set(call_kwargs) & set(kwargs))} given in the spec and as "
                         "keyword arguments; give each once")
    kwargs = {**call_kwargs, **kwargs}
    if spec in _REGISTRY:
        entry = _REGISTRY[spec]
        _check_kwargs(spec, entry.factory, kwargs)
        fn = entry.factory(device=device, **kwargs)
        return Reward(spec, fn, entry.differentiable, entry.description)
    if ":" in spec:
        return _build_user(spec, device, kwargs)
    names = registered_names()
    raise ValueError(
        f"unknown reward {spec!r}.{did_you_mean(spec, names)} Registered rewards: {', '.join(names)}. "
        "Use 'package.module:function' for your own reward, or '1.0*a+0.1*b' for a weighted sum."
    )


def _build_user(spec: str, device, kwargs: dict) -> Reward:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r}: {e}") from e
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ValueError(f"reward {spec!r}: {attr!r} is not callable")
    if _is_reward_fn(obj):
        if kwargs:
            raise ValueError(
                f"reward {spec!r} is a reward function (first parameter 'images'), not a factory; "
                f"it cannot take keyword arguments {sorted(kwargs)}"
            )
        fn = obj
    else:
        _check_kwargs(spec, obj, kwargs)
        if _accepts_kw(obj, "device"):
            fn = obj(device=device, **kwargs)
        else:
            fn = obj(**kwargs)
        if not callable(fn):
            raise ValueError(
                f"reward {spec!r}: the factory returned {type(fn).__name__}, not a function "
                "fn(images, prompts, metadata)"
            )
    description = getattr(fn, "description", None) or _first_doc_line(fn) or _first_doc_line(obj) or ""
    return Reward(spec, fn, bool(getattr(fn, "differentiable", False)), str(description))


def _is_reward_fn(obj) -> bool:
    try:
        params = list(inspect.signature(obj).parameters.values())
    except (TypeError, ValueError):
        return False
    return bool(params) and params[0].name == "images"


def _accepts_kw(obj, name: str) -> bool:
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(
        p.kind == p.VAR_KEYWORD or (p.name == name and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        for p in params
    )


def _first_doc_line(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _format_sum_name(parts: list[tuple[str, float]]) -> str:
    out = ""
    for i, (name, w) in enumerate(parts):
        sign = "-" if w < 0 else ("+" if i else "")
        out += f"{sign}{float(abs(w))!r}*{name}"
    return out


def _build_sum(weights: dict, device) -> Reward:
    if not weights:
        raise ValueError("a weighted sum of rewards needs at least one part")
    parts: list[tuple[Reward, float]] = []
    for spec, w in weights.items():
        try:
            w = float(w)
        except (TypeError, ValueError):
            raise ValueError(f"weight of reward {spec!r} must be a number, got {w!r}") from None
        if not math.isfinite(w):
            raise ValueError(f"weight of reward {spec!r} must be finite, got {w}")
        part = build_reward(spec, device=device)
        parts.append((part, w))
    names = [p.name for p, _ in parts]
    if len(set(names)) != len(names):
        raise ValueError(f"weighted sum names the same reward twice: {names}")
    name = _format_sum_name([(p.name, w) for p, w in parts])
    differentiable = all(p.differentiable for p, _ in parts)
    description = " + ".join(f"{w:g} x [{p.name}: {p.description}]" for p, w in parts)

    def fn(images, prompts, metadata=None):
        total = None
        info: dict = {}
        for part, w in parts:
            r, part_info = part(images, prompts, metadata)  # validated, errors name the part
            info[part.name] = r.detach()
            for k, v in part_info.items():
                info[f"{part.name}/{k}"] = v
            total = w * r if total is None else total + w * r
        return total, info

    fn.differentiable = differentiable
    return Reward(name, fn, differentiable, description, parts=tuple((p.name, w) for p, w in parts))


# ---------------------------------------------------------------- validation

def _batch_size(images, name: str) -> int:
    if torch.is_tensor(images):
        if images.ndim == 0:
            raise RewardError(f"reward {name!r} got a 0-d tensor as images; expected a batch (N, ...)")
        return int(images.shape[0])
    try:
        return len(images)
    except TypeError:
        raise RewardError(
            f"reward {name!r}: images must be a tensor or sequence of samples, got {type(images).__name__}"
        ) from None


def _split_output(out, name: str) -> tuple[Any, dict]:
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping):
        rewards, info = out
        return rewards, dict(info)
    if isinstance(out, tuple) and len(out) == 2 and out[1] is None:
        return out[0], {}
    if torch.is_tensor(out):
        return out, {}
    raise RewardError(
        f"reward {name!r} must return (rewards, info_dict), got {type(out).__name__}"
        + (f" of length {len(out)}" if isinstance(out, tuple) else "")
    )


def _validate_rewards(rewards, images, n: int, name: str) -> torch.Tensor:
    device = images.device if torch.is_tensor(images) else None
    if not torch.is_tensor(rewards):
        try:
            rewards = torch.as_tensor(rewards, dtype=torch.float32, device=device)
        except (TypeError, ValueError, RuntimeError) as e:
            raise RewardError(
                f"reward {name!r} returned {type(rewards).__name__}, which is not array-like "
                f"(expected a float tensor of shape ({n},)): {e}"
            ) from None
    elif device is not None and rewards.device != device:
        rewards = rewards.to(device)
    if rewards.is_complex():
        raise RewardError(f"reward {name!r} returned complex values; expected real floats")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    if tuple(rewards.shape) != (n,):
        raise RewardError(
            f"reward {name!r} returned shape {tuple(rewards.shape)} for {n} images; expected ({n},)"
        )
    bad = ~torch.isfinite(rewards.detach())
    if bool(bad.any()):
        idx = bad.nonzero().flatten().tolist()
        shown = idx[:10]
        more = f" and {len(idx) - 10} more" if len(idx) > 10 else ""
        rng = ""
        if torch.is_tensor(images) and images.numel() and images.is_floating_point():
            x = images.detach()
            rng = f"; images range [{x.min().item():.3g}, {x.max().item():.3g}]"
            if not bool(torch.isfinite(x).all()):
                rng += " (the images themselves contain NaN/inf)"
        raise RewardError(
            f"reward {name!r} returned NaN/inf for {len(idx)} of {n} samples "
            f"(indices {shown}{more}){rng}"
        )
    return rewards

