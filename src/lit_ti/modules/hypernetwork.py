"""AUTOMATIC1111-style hypernetworks: residual MLPs on the inputs of attention K and V.

One `HypernetworkModule` per (context width, K or V). It is built exactly as the webui builds it, so the
state-dict keys (`linear.<i>.weight`) match A1111 files: every Linear, activation, LayerNorm and Dropout takes
an index of one `nn.Sequential`. Forward: `x + f(x) · strength` (strength is 1 while training, as A1111).

`attach(unet, hypernetwork)` wraps each attention's existing processor (diffusers' SDPA one, or whatever is
installed) so that K and V see the transformed context; `detach` puts the original processors back.
"""

from functools import partial

import torch
from torch import Tensor, nn

from lit_ti.errors import UserError, check_choice, check_number, quote

INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")
MAX_LAYERS = 16  # entries of layer_structure
MAX_MULTIPLIER = 16.0  # a hidden layer's width as a multiple of the context width


def check_settings(
    layer_structure, activation_func: str | None, weight_init: str, dropout_structure=None, **_flags
) -> None:
    """A1111's creation options, checked before any module exists: `layer_structure` starts and ends with 1,
    every entry in (0, MAX_MULTIPLIER]; `dropout_structure` has one value in [0, 1) per entry, first and last 0."""
    ls = list(layer_structure) if isinstance(layer_structure, list | tuple) else None
    if ls is None or not 2 <= len(ls) <= MAX_LAYERS or ls[0] != 1 or ls[-1] != 1:
        raise UserError(
            f"method.layer_structure={layer_structure}: a list of 2 to {MAX_LAYERS} multipliers starting and ending "
            "with 1, e.g. [1, 2, 1]"
        )
    for x in ls:
        check_number("method.layer_structure", x, 0, MAX_MULTIPLIER, low_open=True, hint="each entry, e.g. [1, 2, 1]")
    if dropout_structure is not None:
        dropout = list(dropout_structure) if isinstance(dropout_structure, list | tuple) else None
        if dropout is None or len(dropout) != len(ls) or dropout[0] != 0 or dropout[-1] != 0:
            raise UserError(
                f"method.dropout_structure={dropout_structure}: one value per layer_structure entry, first and "
                "last 0 (A1111), e.g. [0, 0.3, 0]"
            )
        for p in dropout:
            check_number("method.dropout_structure", p, 0, 0.99, hint="each entry a dropout probability")
    check_choice("method.weight_initialization", weight_init, INITS)
    activation(activation_func)


def activation(name: str | None) -> nn.Module | None:
    """A1111's activation names: `linear`/None = none, `swish` = Hardswish (its quirk, kept for file
    compatibility), otherwise any `torch.nn` activation by lowercased class name."""
    if name in (None, "linear"):
        return None
    special = {"relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU, "swish": nn.Hardswish, "tanh": nn.Tanh}
    special["sigmoid"] = nn.Sigmoid
    if name in special:
        return special[name]()
    builtin = {cls.lower(): getattr(nn.modules.activation, cls) for cls in nn.modules.activation.__all__}
    builtin.pop("multiheadattention", None)
    if name not in builtin:
        raise UserError(f"method.activation_func={quote(name)}: use linear, {', '.join(sorted({*special, *builtin}))}")
    return builtin[name]()


class HypernetworkModule(nn.Module):
    """Residual MLP on `[..., dim]` contexts; the A1111 layout of `linear` decides the state-dict keys."""

    def __init__(
        self,
        dim: int,
        layer_structure: list[float] = (1, 2, 1),
        activation_func: str | None = "linear",
        weight_init: str = "Normal",
        add_layer_norm: bool = False,
        activate_output: bool = False,
        dropout_structure: list[float] | None = None,
    ) -> None:
        super().__init__()
        check_settings(layer_structure, activation_func, weight_init, dropout_structure)
        ls = list(layer_structure)
        dropout = list(dropout_structure) if dropout_structure is not None else [0.0] * len(ls)
        layers: list[nn.Module] = []
        for i in range(len(ls) - 1):
            layers.append(nn.Linear(int(dim * ls[i]), int(dim * ls[i + 1])))
            act = activation(activation_func)
            if act is not None and (i < len(ls) - 2 or activate_output):
                layers.append(act)
            if add_layer_norm:
                layers.append(nn.LayerNorm(int(dim * ls[i + 1])))
            if dropout[i + 1] > 0:
                layers.append(nn.Dropout(p=dropout[i + 1]))
        self.linear = nn.Sequential(*layers)
        self.strength = 1.0
        self._init(weight_init, activation_func)

    @torch.no_grad()
    def _init(self, kind: str, activation_func: str | None) -> None:
        for layer in self.linear:
            if not isinstance(layer, nn.Linear | nn.LayerNorm):
                continue
            w, b = layer.weight, layer.bias
            if kind == "Normal" or isinstance(layer, nn.LayerNorm):  # A1111: LayerNorm weights ~ N(0, 0.01) too
                w.normal_(0.0, 0.01)
            elif kind == "XavierUniform":
                nn.init.xavier_uniform_(w)
            elif kind == "XavierNormal":
                nn.init.xavier_normal_(w)
            else:
                relu = "leaky_relu" if activation_func == "leakyrelu" else "relu"
                (nn.init.kaiming_uniform_ if kind == "KaimingUniform" else nn.init.kaiming_normal_)(
                    w, nonlinearity=relu
                )
            b.zero_()

    def forward(self, x: Tensor) -> Tensor:
        strength = 1.0 if self.training else self.strength
        return x + self.linear(x.to(self.linear[0].weight.dtype)).to(x.dtype) * strength


class Hypernetwork(nn.Module):
    """Pairs of modules (K, V) per context width; `settings` are A1111's creation options."""

    def __init__(self, sizes: list[int], **settings) -> None:
        super().__init__()
        self.settings = settings
        self.layers = nn.ModuleDict(
            {str(size): nn.ModuleList([HypernetworkModule(size, **settings) for _ in range(2)]) for size in sizes}
        )

    @property
    def sizes(self) -> list[int]:
        return [int(s) for s in self.layers]

    def set_strength(self, strength: float) -> None:
        for module in self.modules():
            if isinstance(module, HypernetworkModule):
                module.strength = strength

    def pair(self, width: int) -> nn.ModuleList | None:
        return self.layers[str(width)] if str(width) in self.layers else None  # noqa: SIM401 (no ModuleDict.get)


class _KVProxy:
    """Looks like the Attention module to its processor, but K and V inputs first pass through the pairs.

    joint: SD3's joint attention, whose context stream has its own K/V projections (`add_k_proj`,
    `add_v_proj`); those are the ones wrapped there, and the image stream's `to_k`/`to_v` stay as they are."""

    def __init__(self, attn, pairs: list[nn.ModuleList], joint: bool = False) -> None:
        self._attn, self._pairs = attn, pairs
        self._kv = ("add_k_proj", "add_v_proj") if joint else ("to_k", "to_v")

    def __getattr__(self, name: str):
        if name in self._kv:
            return partial(self._through, self._kv.index(name), getattr(self._attn, name))
        return getattr(self._attn, name)

    def _through(self, index: int, projection, x: Tensor) -> Tensor:
        for pair in self._pairs:  # several hypernetworks chain (A1111)
            x = pair[index](x)
        return projection(x)


class HypernetworkProcessor:
    """Wraps an attention processor: the context (for self-attention, the hidden states) goes through the
    pair of its width before the K / V projections. Q is never touched, as in A1111. In SD3's joint attention
    the context stream's K/V (`add_k_proj`, `add_v_proj`) are the ones that take the pairs."""

    def __init__(self, inner, hypernetworks: list[Hypernetwork]) -> None:
        self.inner, self.hypernetworks = inner, hypernetworks

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None, *args, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        pairs = [p for p in (hn.pair(context.shape[-1]) for hn in self.hypernetworks) if p is not None]
        joint = encoder_hidden_states is not None and getattr(attn, "add_k_proj", None) is not None
        target = _KVProxy(attn, pairs, joint) if pairs else attn
        return self.inner(target, hidden_states, encoder_hidden_states, *args, **kwargs)


def attach(unet, hypernetworks: Hypernetwork | list[Hypernetwork], self_attention: bool = True) -> dict:
    """Wrap every attention processor of `unet` (or SD3's MMDiT); returns the original processors for `detach`.

    self_attention: also transform self-attention K/V at widths the hypernetwork has (A1111 does; its
    320/640/1280 modules exist for that; SD3.5's extra image-only attention counts as self-attention).
    False: only the text contexts (cross-attention, SD3's joint attention's context stream).
    """
    hns = hypernetworks if isinstance(hypernetworks, list) else [hypernetworks]
    original = dict(unet.attn_processors)
    wrapped = {}
    for name, proc in original.items():
        attn = unet.get_submodule(name.removesuffix(".processor"))
        is_self = not attn.is_cross_attention and getattr(attn, "add_k_proj", None) is None  # no text context
        wrapped[name] = proc if (is_self and not self_attention) else HypernetworkProcessor(proc, hns)
    unet.set_attn_processor(wrapped)
    return original


def detach(unet, original: dict) -> None:
    """Put back the processors `attach` returned."""
    unet.set_attn_processor(dict(original))
