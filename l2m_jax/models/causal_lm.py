"""ONE CausalLM: a Llama/Mistral trunk whose per-layer mixer is attention, Mamba-1 or Mamba2 by config."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..cache import DecodeState, SpecSSMCache, SpecState
from ..config import ModelConfig
from ..ops.rope import rope_inv_freq
from .layers import MLP, Attention, Context, RMSNorm, linear
from .mamba import MambaMixer
from .mamba2 import Mamba2Mixer

_MIXERS = {"attention": Attention, "mamba": MambaMixer, "mamba2": Mamba2Mixer}

# Rematerialisation policies, the one table of the `remat` argument (forward, CausalLM.hidden/__call__). Each
# layer runs under jax.checkpoint with the policy; the policy names what the backward pass may keep from the
# forward pass, and everything else inside the layer is recomputed. Besides these names: False / None / "none"
# (no remat: every residual kept) and True (= "full").
#   "full"     keep nothing inside a layer, only its input: the whole layer's forward runs again in the backward
#              pass (least memory, ~1 extra forward).
#   "dots"     keep the outputs of matmuls without batch dimensions, i.e. the weight matmuls (q/k/v/o, the
#              mixers' in/out projections, the MLP); recompute elementwise work (norms, activations, RoPE,
#              gates, the scan) and the batched einsums of attention scores and the SSD, whose [B, H, L, L] /
#              per-chunk outputs are the large ones (jax.checkpoint_policies.dots_with_no_batch_dims_saveable).
#   "dots_all" keep every matmul output, attention scores and SSD einsums included; recompute only
#              elementwise work (jax.checkpoint_policies.dots_saveable): more memory than "dots".
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_all": jax.checkpoint_policies.dots_saveable,
}


def remat_policy(remat):
    """`remat` (False/None/"none", True, or a name of REMAT_POLICIES) -> (enabled, jax.checkpoint policy)."""
    if isinstance(remat, str):
        if remat == "none":
            return False, None
        if remat in REMAT_POLICIES:
            return True, REMAT_POLICIES[remat]
    elif remat is None or isinstance(remat, (bool, np.bool_)):
        return (True, REMAT_POLICIES["full"]) if remat else (False, None)
    choices = ", ".join(["False", "None", "True", '"none"'] + [f'"{k}"' for k in REMAT_POLICIES])
    raise ValueError(f"unknown remat policy {remat!r}; choose one of {choices}")


class Block(nnx.Module):
    """h = x + mixer(norm(x)); out = h + mlp(norm(h))."""

    def __init__(self, cfg: ModelConfig, mixer: str, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_eps, pdt)
        self.mixer = _MIXERS[mixer](cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.rms_eps, pdt)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, ctx: Context, cache):
        return self.forward_io(x, ctx, cache)[:2]

    def forward_io(self, x, ctx: Context, cache, mixer=None):
        """(block output, new cache, the mixer's normalised input u, the mixer's output h).

        mixer: None, or a callable (u, ctx, cache) -> (h, cache) run in place of the block's own mixer."""
        mix = self.mixer.verify if isinstance(cache, SpecSSMCache) else self.mixer
        mix = mix if mixer is None else mixer
        u = self.attn_norm(x)
        h, cache = mix(u, ctx, cache)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), cache, u, h


def _gathered(layer: nnx.Module, gather) -> nnx.Module:
    """`layer` with `gather` applied to its parameters (the layer itself when gather is None)."""
    if gather is None:
        return layer
    graphdef, state = nnx.split(layer)
    return nnx.merge(graphdef, gather(state))


class CausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dt, param_dtype=pdt,
                               embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.layers = nnx.List([Block(cfg, m, rngs) for m in cfg.layer_mixers])
        self.final_norm = RMSNorm(cfg.d_model, cfg.rms_eps, pdt)
        if not cfg.tie_embeddings:
            self.lm_head = linear(cfg, cfg.d_model, cfg.vocab_size, rngs)

    def _context(self, tokens, state, mask, backend: str) -> Context:
        cfg = self.cfg
        b, l = tokens.shape
        has_mask = mask is not None
        mask = jnp.ones((b, l), bool) if mask is None else mask.astype(bool)
        if state is None:
            positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
            new_lengths = None
        else:
            positions = state.lengths[:, None] + jnp.arange(l, dtype=jnp.int32)[None]
            new_lengths = state.lengths + jnp.sum(mask, axis=1, dtype=jnp.int32)
        inv_freq = jnp.asarray(rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
        spec = isinstance(state, SpecState)
        if spec and has_mask:
            raise ValueError("a verifier call (SpecState) takes no mask: every token of it is real")
        return Context(positions, mask, new_lengths, inv_freq, has_mask, state.n_replay if spec else None, backend)

    def hidden(self, tokens, *, state: DecodeState | SpecState | None = None, mask=None, backend: str = "xla",
               remat: bool | str | None = False, gather=None):
        """tokens int32 [B, L] -> (final hidden [B, L, D] after the final norm, new state).

        remat: a rematerialisation policy for full-sequence calls (state=None), see REMAT_POLICIES.
        gather: None, or a function of one layer's parameter pytree applied where that layer runs (inside its
        rematerialised call), and to the embedding, e.g. `parallel.fsdp_gather(mesh)`: only one layer's
        all-gathered weights are live, and the activations keep the rows' sharding of `tokens`.

        A SpecState runs the speculative verifier: every token is real (no mask), Mamba layers replay and
        checkpoint; the returned lengths count all L tokens (the caller commits the accepted ones).
        """
        use_remat, policy = remat_policy(remat)
        ctx = self._context(tokens, state, mask, backend)
        x = _gathered(self.embed, gather)(tokens)
        caches = []
        for i, layer in enumerate(self.layers):
            if use_remat and state is None:
                run = lambda h, layer=layer: _gathered(layer, gather)(h, ctx, None)  # noqa: E731
                x, c = jax.checkpoint(run, policy=policy)(x)
            else:
                x, c = _gathered(layer, gather)(x, ctx, None if state is None else state.layers[i])
            caches.append(c)
        x = self.final_norm(x)
        if state is None:
            return x, None
        if isinstance(state, SpecState):
            return x, SpecState(tuple(caches), ctx.new_lengths, state.n_replay)
        return x, DecodeState(tuple(caches), ctx.new_lengths)

    def mixer_io(self, tokens, layers, *, mask=None):
        """The inputs and outputs of the mixers of `layers` in one full-sequence forward.

        tokens int32 [B, L] -> ({i: normalised block input [B, L, D]}, {i: mixer output [B, L, D]}): what a
        layer's mixer sees (after its pre-norm) and what it adds to the residual stream. Stops after the last
        layer asked for.
        """
        layers = sorted({int(i) for i in layers})
        ctx = self._context(tokens, None, mask, "xla")
        x = self.embed(tokens)
        inputs, outputs = {}, {}
        for i in range(layers[-1] + 1 if layers else 0):
            x, _, u, h = self.layers[i].forward_io(x, ctx, None)
            if i in layers:
                inputs[i], outputs[i] = u, h
        return inputs, outputs

    def attention_probabilities(self, tokens, layers=None, *, mask=None):
        """{i: attention weights [B, H, L, L] fp32} of the attention layers among `layers` (None: every attention
        layer) in one full-sequence forward (`Attention.probabilities` on each layer's normalised input)."""
        attn = [i for i, m in enumerate(self.cfg.layer_mixers) if m == "attention"]
        layers = attn if layers is None else sorted({int(i) for i in layers} & set(attn))
        ctx = self._context(tokens, None, mask, "xla")
        inputs, _ = self.mixer_io(tokens, layers, mask=mask)
        return {i: self.layers[i].mixer.probabilities(inputs[i], ctx) for i in layers}

    def swap_hidden(self, tokens, donor: "CausalLM", sel, *, mask=None):
        """Final hidden states [B, L, D] of this model with layer `sel`'s mixer taken from `donor` (same trunk;
        its mixers differ at some layers): sel is an int32 scalar, traced, so one compiled program serves every
        choice of layer (lax.cond runs one mixer per layer at run time). A sel at which the two models' mixers
        do not differ leaves this model as it is."""
        def swapped(i, own):
            if donor.cfg.layer_mixers[i] == self.cfg.layer_mixers[i]:
                return None
            other = donor.layers[i].mixer
            return lambda u, ctx: jax.lax.cond(sel == i, lambda u: other(u, ctx, None)[0],
                                               lambda u: own(u, ctx, None)[0], u)
        return self._hidden_replacing(tokens, swapped, mask)

    def ablated_hidden(self, tokens, sel, *, mask=None):
        """Final hidden states [B, L, D] with layer `sel`'s mixer output removed (the block keeps its residual
        and MLP): sel is an int32 scalar, traced, so one compiled program serves every layer; a sel that names
        no layer (e.g. -1) removes nothing."""
        def removed(i, own):
            def mix(u, ctx):
                h = own(u, ctx, None)[0]
                return jnp.where(sel == i, jnp.zeros_like(h), h)
            return mix
        return self._hidden_replacing(tokens, removed, mask)

    def _hidden_replacing(self, tokens, replace, mask):
        """A full-sequence forward to the final hidden states in which layer i's mixer output is
        replace(i, own mixer)(u, ctx), where that returns a function (None: the layer runs as it is)."""
        ctx = self._context(tokens, None, mask, "xla")
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            mix = replace(i, layer.mixer)
            if mix is None:
                x = layer(x, ctx, None)[0]
            else:
                x = layer.forward_io(x, ctx, None, mixer=lambda u, ctx, cache, mix=mix: (mix(u, ctx), cache))[0]
        return self.final_norm(x)

    def apply_mixer(self, i: int, u, *, mask=None):
        """Layer i's mixer on its normalised input u [B, L, D] -> [B, L, D] (a full sequence, no cache)."""
        return self.layers[i].mixer(u, self._context(u[..., 0], None, mask, "xla"), None)[0]

    def logits(self, x, gather=None):
        """x [..., D] -> fp32 logits [..., V]. gather: as in `hidden`, applied to the head."""
        w = self.embed.embedding[...].T if self.cfg.tie_embeddings else self.lm_head.kernel[...]
        w = w if gather is None else gather(w)
        return jnp.einsum("...D,DV->...V", x, w.astype(x.dtype), preferred_element_type=jnp.float32)

    def __call__(self, tokens, *, state=None, mask=None, backend: str = "xla", remat: bool | str | None = False,
                 gather=None):
        x, state = self.hidden(tokens, state=state, mask=mask, backend=backend, remat=remat, gather=gather)
        return self.logits(x, gather), state


@functools.lru_cache(maxsize=64)
def _graph(cfg: ModelConfig):
    """(graphdef, abstract state) of the model for `cfg`, built once without allocating weights."""
    model = nnx.eval_shape(lambda: CausalLM(cfg, nnx.Rngs(0)))
    return nnx.split(model)


def abstract_params(cfg: ModelConfig):
    """The parameter tree as jax.ShapeDtypeStruct leaves (restore targets, shardings, loaders)."""
    return nnx.to_pure_dict(_graph(cfg)[1])


def shape_structs(tree):
    """`tree` with every array (or jax.ShapeDtypeStruct) leaf as a plain jax.ShapeDtypeStruct of its shape and
    dtype: what ahead-of-time lowering takes, without the arrays' placement."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def init_params(cfg: ModelConfig, key) -> dict:
    """Random parameters: N(0, 0.02) for the trunk, MiL's (PyTorch-default) init for Mamba mixers."""
    if isinstance(key, int):
        key = jax.random.key(key)
    model = CausalLM(cfg, nnx.Rngs(params=key))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def bind(cfg: ModelConfig, params) -> CausalLM:
    """A CausalLM module view over `params` (a pure dict); cheap, works under jit."""
    graphdef, abstract = _graph(cfg)
    state = jax.tree.map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def _bad_ids(vocab_size: int, lo: int, hi: int) -> str:
    return (f"token ids must lie in [0, {vocab_size}) (the model's vocab); got min {lo}, max {hi}: was the text "
            "encoded with another tokenizer?")


def check_tokens(cfg: ModelConfig, tokens) -> None:
    """Raise on token ids outside [0, V) when the ids are concrete (not traced); on a shape other than [B, L]
    and a non-integer dtype either way."""
    if np.ndim(tokens) != 2:
        raise ValueError(f"tokens must be int [B, L], got shape {np.shape(tokens)}")
    if isinstance(tokens, jax.core.Tracer):
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        return
    t = np.asarray(tokens)
    if not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"tokens must be integer ids, got dtype {t.dtype}")
    if t.size and (t.min() < 0 or t.max() >= cfg.vocab_size):
        raise ValueError(_bad_ids(cfg.vocab_size, t.min(), t.max()))


def _too_long(needed: int, limit: int) -> str:
    return (f"the sequence needs {needed} positions but the model's attention layers were trained for {limit} "
            "(max_position_embeddings); shorten it: fewer tokens (a shorter prompt, a smaller max_new_tokens)")


def check_length(cfg: ModelConfig, needed: int) -> None:
    """The one context-length rule of forward, generate and speculative_generate.

    A model with attention layers runs at most max_position_embeddings positions (RoPE past the trained
    length is extrapolation); a pure-Mamba model has no limit. `needed`: the positions the call would reach.
    """
    if cfg.attn_layers and needed > cfg.max_position_embeddings:
        raise ValueError(_too_long(needed, cfg.max_position_embeddings))


def _raise_if_bad(vocab_size: int, limit: int | None, lo, hi, needed) -> None:
    """Host side of the run-time check under jit: the errors the eager checks raise."""
    if lo < 0 or hi >= vocab_size:
        raise ValueError(_bad_ids(vocab_size, int(lo), int(hi)))
    if limit is not None and needed > limit:
        raise ValueError(_too_long(int(needed), limit))


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _check_inputs(cfg: ModelConfig, tokens, state, mask) -> None:
    """Ids in [0, V) and the length rule: now where the values are concrete, at run time where traced."""
    check_tokens(cfg, tokens)
    b, l = np.shape(tokens)
    if state is None:
        needed = l  # the shape is static, even under jit
    else:  # each row continues at its length; pads (mask False) take no position
        real = l if mask is None else jnp.sum(jnp.asarray(mask, bool), axis=1, dtype=jnp.int32)
        needed = jnp.max(jnp.asarray(state.lengths, jnp.int32) + real) if b else 0
    if not _is_traced(needed):
        check_length(cfg, int(needed))
    ids_later = _is_traced(tokens) and b * l > 0
    limit = cfg.max_position_embeddings if cfg.attn_layers and _is_traced(needed) else None
    if ids_later or limit is not None:
        t = jnp.asarray(tokens, jnp.int32)
        lo, hi = (jnp.min(t), jnp.max(t)) if ids_later else (0, 0)
        jax.debug.callback(functools.partial(_raise_if_bad, cfg.vocab_size, limit), lo, hi, needed)


def forward(cfg: ModelConfig, params, tokens, state: DecodeState | None = None, *, mask=None,
            remat: bool | str | None = False, checked: bool = True, gather=None):
    """Logits float32 [B, L, V] for tokens int32 [B, L] and the advanced state.

    state=None: a plain full-sequence forward (training, scoring); returns (logits, None).
    With a state (from `l2m_jax.cache.init_state`): tokens continue each row at `state.lengths`; prefill and
    decode are this same call. mask bool [B, L] marks real tokens (right padding); pads leave the state alone.
    remat rematerialises each layer in the backward pass (memory for long training sequences): True or "full"
    recomputes whole layers, "dots" keeps the weight matmuls' outputs and recomputes the rest, "dots_all" keeps
    every matmul output; False/None/"none" keeps everything (REMAT_POLICIES). An unknown name raises ValueError.

    checked=True (the default) raises ValueError for ids outside [0, V) and for sequences longer than
    max_position_embeddings (a model with attention layers; `check_length`, the rule generate uses).
    Called eagerly, the check runs before any compute. Under jax.jit the length of a stateless call is
    checked while tracing; ids (and a traced state's lengths) are checked at run time by a jax.debug.callback
    (two scalars to the host per call), so the jitted call raises jax.errors.JaxRuntimeError carrying the
    same message instead of returning NaN logits for ids >= V or silently wrapping negative ids.
    checked=False adds nothing to the program: for inputs already validated (by the data pipeline, say).
    gather: None, or `parallel.fsdp_gather(mesh)` on an fsdp mesh: each layer all-gathers its own weights where
    it runs (see `CausalLM.hidden`); the values are the same either way.
    """
    if checked:
        _check_inputs(cfg, tokens, state, mask)
    return bind(cfg, params)(jnp.asarray(tokens, jnp.int32), state=state, mask=mask, remat=remat, gather=gather)


def mixer_io(cfg: ModelConfig, params, tokens, layers, *, mask=None, checked: bool = True):
    """({i: normalised input [B, L, D]}, {i: mixer output [B, L, D]}) of `layers` for tokens int32 [B, L].

    checked: as in `forward`."""
    if checked:
        _check_inputs(cfg, tokens, None, mask)
    return bind(cfg, params).mixer_io(jnp.asarray(tokens, jnp.int32), layers, mask=mask)


def attention_probabilities(cfg: ModelConfig, params, tokens, layers=None, *, mask=None, checked: bool = True):
    """{i: attention weights fp32 [B, H, L, L]} of the attention layers among `layers` (None: all of them) for
    tokens int32 [B, L] (`CausalLM.attention_probabilities`). checked: as in `forward`."""
    if checked:
        _check_inputs(cfg, tokens, None, mask)
    return bind(cfg, params).attention_probabilities(jnp.asarray(tokens, jnp.int32), layers, mask=mask)


def apply_mixer(cfg: ModelConfig, params, i: int, u, *, mask=None):
    """Layer i's mixer alone on its normalised input u [B, L, D] -> [B, L, D]."""
    return bind(cfg, params).apply_mixer(i, u, mask=mask)
