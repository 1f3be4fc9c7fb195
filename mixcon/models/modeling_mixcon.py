"""MixCon as a transformers model: MixConModel and MixConForCausalLM (docs/architecture.md).

Imports are absolute (``mixcon.…``) on purpose: `save_pretrained` copies this file next to the
weights for ``trust_remote_code`` loading, and the copy then imports the installed package.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast

try:
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # pragma: no cover - older transformers
    GradientCheckpointingLayer = nn.Module

try:
    from transformers import initialization as hf_init  # guards tensors loaded from a checkpoint
except ImportError:  # pragma: no cover
    hf_init = None

# The mixcon imports sit in one try block: transformers' check_imports skips imports inside try blocks,
# so a process without mixcon gets this message instead of "pip install mixcon" (not on any index).
try:
    from mixcon.layers.attention import MixConAttention, attention_impl, rope_cos_sin
    from mixcon.layers.common import TorchInit, is_static_cache
    from mixcon.layers.conba import ConbaMixer
    from mixcon.layers.linear import Linear
    from mixcon.layers.mlp import SwiGLUMLP
    from mixcon.layers.mod import DepthRoutedMixin, DepthRouter
    from mixcon.layers.moe import MoEExperts, SparseMoE
    from mixcon.layers.mom import MoMPool, MoMRound
    from mixcon.layers.spatial import SpatialMixer
    from mixcon.layers.norm import RMSNorm
    from mixcon.models.cache import MixConCache
    from mixcon.models.compat import CACHE_FIELD, CACHE_NAMES, GENERATE_CACHE_KEY, check_kwargs, resolve_cache
    from mixcon.models.configuration_mixcon import MixConConfig
    from mixcon.models.inputs import check_inputs, tracing
    from mixcon.models.masks import build_attention_mask, custom_attention_mask, static_masks
    from mixcon.ops.moe import load_balancing_loss, router_z_loss
except ImportError as e:
    if e.name != "mixcon" and not (e.name or "").startswith("mixcon."):
        raise  # a dependency of mixcon is missing: its own message names it
    raise ImportError(
        "this MixCon model needs the mixcon package"
        + (" (not installed)" if e.name == "mixcon" else f", a version with {e.name} (the installed one is older)")
        + ": pip install <a checkout of the mixcon repository>, or the wheel `pip wheel --no-deps .` builds in one; "
        "mixcon is not on a package index") from e


def _auto_static(device, generation_config, model_kwargs) -> bool:
    """Whether generate() takes the static cache (and with it transformers' compiled, CUDA-graph
    decode) without being asked: on a CUDA device, for greedy or sampled decoding of one candidate
    per row with no cache passed in. ``cache_implementation="dynamic"`` (or ``disable_compile=True``
    for the static cache without compiling) opts out."""
    return (torch.device(device).type == "cuda" and _given_cache(model_kwargs) is None
            and generation_config.use_cache is not False and (generation_config.num_beams or 1) == 1
            and getattr(generation_config, "assistant_model", None) is None
            and getattr(generation_config, "prompt_lookup_num_tokens", None) is None)


def _given_cache(model_kwargs):
    """The cache in generate's model kwargs, under whichever name this transformers keeps it."""
    return resolve_cache(*(model_kwargs.get(k) for k in CACHE_NAMES))


class MixConDecoderLayer(DepthRoutedMixin, GradientCheckpointingLayer):
    """x + mixer(norm(x)); x + ffn(norm(x)), mixer ∈ {attention, conba, spatial}, ffn ∈ {mlp, moe, none};
    or one Mixture-of-Modules round (mixer "mom": assembled attention and FFN from the model's pool).
    With Mixture-of-Depths routing (``layers_mod_type``) only the tokens the router selects pass
    through the routed part (the whole layer, or the FFN of a Conba/spatial layer)."""

    def __init__(self, config: MixConConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.mixer_type = config.layers_block_type[layer_idx]
        self.ffn_type = config.layers_ffn_type[layer_idx]
        self.mod_type = config.layers_mod_type[layer_idx]
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if self.mixer_type == "attention":
            self.mixer = MixConAttention(config, layer_idx)
        elif self.mixer_type == "conba":
            self.mixer = ConbaMixer(config, layer_idx)
        elif self.mixer_type == "spatial":
            self.mixer = SpatialMixer(config, layer_idx)
        else:
            self.mixer = MoMRound(config, layer_idx)
        if self.ffn_type != "none" or self.mixer_type == "mom":
            self.pre_ff_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if self.ffn_type == "moe":
            self.feed_forward = SparseMoE(config)
        elif self.ffn_type == "mlp":
            self.feed_forward = SwiGLUMLP(config.hidden_size, config.intermediate_size)
        if self.mod_type != "none":
            self.depth_router = DepthRouter(config)

    def forward(self, hidden_states, attn_mask=None, seq_mask=None, rope=None, past_key_values=None,
                positions=None, mom_pool=None, attn_impl: str = "sdpa", **kwargs):
        """→ (hidden_states, router_logits (b·T, E) or None, their token mask (b·T,) bool or None,
        auxiliary loss of this layer (MoD BCE / MoM balance, coefficient applied) or None,
        attention weights (b, H, T, past + T) when ``attn_impl == "eager"`` and the layer attends, else None)."""
        if self.mod_type == "layer":
            return self._routed_layer(hidden_states, seq_mask, rope, past_key_values, positions, attn_impl)
        residual = hidden_states
        h = self.input_layernorm(hidden_states)
        if self.mixer_type == "mom":
            return self._mom_round(hidden_states, h, attn_mask, seq_mask, rope, past_key_values, mom_pool, attn_impl)
        weights = None
        if self.mixer_type == "attention":
            h, weights = self.mixer(h, attn_mask=attn_mask, rope=rope, past_key_values=past_key_values,
                                    impl=attn_impl, return_weights=True)
        elif self.mixer_type == "conba":
            state = past_key_values.conba_states[self.layer_idx] if past_key_values is not None else None
            if is_static_cache(past_key_values):  # the new state is copied into the cache's own tensors
                work = dict(state)
                h = self.mixer(h, mask=seq_mask, state=work)
                past_key_values.layers[self.layer_idx].store(work)
            else:
                h = self.mixer(h, mask=seq_mask, state=state)
        else:
            state = None
            if past_key_values is not None:  # a static history is written in place through the layer
                state = (past_key_values.layers[self.layer_idx] if is_static_cache(past_key_values)
                         else past_key_values.spatial_states[self.layer_idx])
            h = self.mixer(h, positions, state=state)
        hidden_states = residual + h
        if self.ffn_type == "none":  # mixer-only layer (a Mamba-1 LM)
            return hidden_states, None, None, None, weights
        if self.mod_type == "ffn":
            return self._routed_ffn(hidden_states, seq_mask)
        h, router_logits = self._ffn(self.pre_ff_layernorm(hidden_states))
        return hidden_states + h, router_logits, None, None, weights

    def _ffn(self, h):
        if self.ffn_type == "moe":
            return self.feed_forward(h)
        return self.feed_forward(h), None

    def _mom_round(self, residual, h, attn_mask, seq_mask, rope, past_key_values, pool, attn_impl):
        a, la, ia, weights = self.mixer.attention(h, pool, attn_mask=attn_mask, rope=rope,
                                                  past_key_values=past_key_values, impl=attn_impl)
        x = residual + a
        f, lf, i_f = self.mixer.ffn(self.pre_ff_layernorm(x), pool)
        self.mixer.last_choices = (ia.detach(), i_f.detach())
        token_mask = seq_mask.reshape(-1).bool() if seq_mask is not None else None
        return x + f, None, None, self.mixer.balance_loss(la, lf, token_mask), weights

class MixConPreTrainedModel(PreTrainedModel):
    config_class = MixConConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MixConDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True  # attention runs through SDPA by default, or written out with "eager"
    _supports_flash_attn = False
    _supports_flex_attn = False
    _is_stateful = True  # a recurrent state cannot be rewound: no assisted generation
    _can_compile_fullgraph = True  # a decode step on a static cache compiles without graph breaks

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward builds its own MixConCache

    def _init_weights(self, module):
        init = hf_init if hf_init is not None else TorchInit
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, MoEExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, MoMPool):
            for p in (module.q_proj, module.k_proj, module.v_proj, module.o_proj):
                init.normal_(p, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, SpatialMixer):
            module.reset_parameters_(init)
        elif isinstance(module, ConbaMixer):  # after its children: re-initialises in_proj, conv1d and the
            module.reset_parameters(hf_init)   # selection as mamba_ssm does (docs/conba.md, "Initialisation")


class MixConModel(MixConPreTrainedModel):
    def __init__(self, config: MixConConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([MixConDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        # the Mixture-of-Modules pool, shared by every "m" round (passed to them at forward time)
        self.mom_pool = MoMPool(config) if "mom" in config.layers_block_type else None
        self.final_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[MixConCache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        cache: Optional[MixConCache] = None,
        cache_params: Optional[MixConCache] = None,
        labels: Optional[torch.LongTensor] = None,
        shift_labels: Optional[torch.LongTensor] = None,
        **kwargs,
    ) -> MoeModelOutputWithPast | tuple:
        """``output_attentions`` / ``output_hidden_states`` / ``return_dict`` default to the config's
        (``return_dict=False`` gives the output's fields as a tuple). ``attentions`` holds the weights of
        the layers that attend (attention layers and MoM rounds), in layer order.

        The cache is taken as ``cache`` (transformers ≥ 5.24), ``past_key_values`` or ``cache_params``
        and returned in the output field the installed transformers reads (`compat.CACHE_FIELD`).
        ``labels`` / ``shift_labels`` are only checked here (the loss is the causal LM's). Any other
        keyword argument that transformers does not document for forward raises a TypeError."""
        check_kwargs(f"{type(self).__name__}.forward", kwargs)
        past_key_values = resolve_cache(cache, past_key_values, cache_params)
        cfg = self.config
        use_cache = cfg.use_cache if use_cache is None else use_cache
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = _use_return_dict(cfg) if return_dict is None else return_dict
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if isinstance(past_key_values, Cache) and not isinstance(past_key_values, MixConCache):
            if past_key_values.get_seq_length() > 0:
                raise ValueError(
                    f"past_key_values is a non-empty {type(past_key_values).__name__}; MixCon needs a MixConCache "
                    "(it holds the Conba states beside the attention K/V)")
            past_key_values = None  # an empty foreign cache (e.g. built by generate) is replaced
        mask4d = None
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
            mask4d, attention_mask = attention_mask, None  # a mask per query (see `custom_attention_mask`)
        b, T, past = check_inputs(cfg, input_ids, inputs_embeds, attention_mask, past_key_values,
                                   labels, shift_labels, position_ids)
        if use_cache and past_key_values is None:
            past_key_values = MixConCache(cfg)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        device = inputs_embeds.device
        attn_impl = attention_impl(cfg, output_attentions)

        static = use_cache and is_static_cache(past_key_values)
        if mask4d is not None:
            mask4d = custom_attention_mask(cfg, mask4d.to(device), b, T, past, is_static_cache(past_key_values))
        if static:
            past_key_values._counter.to_(device)
            past_key_values._counter.window = None
        if static and tracing():
            # fixed shapes: masks over the cache's max_cache_len slots, positions from the device counter
            seq_mask, attn_mask, position_ids = static_masks(past_key_values, attention_mask, position_ids, b, T,
                                                              device)
        else:
            mask2d = attention_mask
            if static:  # eager (a prefill): the layers return the past + T slots in use, masked as below
                past_key_values._counter.window = past + T
                if mask2d is not None:
                    mask2d = mask2d[:, :past + T]
            # Masks: None wherever there is no padding, so the fast paths (is_causal, no-mask scans) apply
            # (in eager mode only: under compile/export the mask is kept as given, without reading it).
            if mask2d is not None and not tracing() and bool(mask2d.all()):
                mask2d = None
            seq_mask = mask2d[:, -T:] if mask2d is not None else None
            attn_mask = build_attention_mask(mask2d, T, past, device) if mask4d is None else mask4d
        # positions in each sequence (left padding excluded; −1 at padded places): RoPE, the spatial
        # mixers' (time × time) weights and Mixture-of-Depths' causal order use them
        if position_ids is not None:
            position_ids = position_ids.expand(b, T)  # (1, T): one row of positions for the whole batch
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask[:, :past + T].long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=device)[None].expand(b, T)
        positions = position_ids.masked_fill(~seq_mask.bool(), -1) if seq_mask is not None else position_ids
        rope = None
        if cfg.use_rope:
            rope = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, inputs_embeds.dtype)

        hidden_states = inputs_embeds
        all_hidden = () if output_hidden_states else None
        all_attn = () if output_attentions else None
        router_logits, router_masks, aux_losses = (), (), []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden += (hidden_states,)
            hidden_states, logits, logits_mask, aux, weights = layer(
                hidden_states, attn_mask=attn_mask, seq_mask=seq_mask, rope=rope,
                past_key_values=past_key_values if use_cache else None, positions=positions,
                mom_pool=self.mom_pool, attn_impl=attn_impl)
            if logits is not None:
                router_logits += (logits,)
                router_masks += (logits_mask,)
            if aux is not None:
                aux_losses.append(aux)
            if output_attentions and layer.mixer_type in ("attention", "mom"):
                if static and weights.shape[-1] < past_key_values.max_cache_len:
                    # a static cache's weights are over its max_cache_len slots at every step (as with
                    # transformers' StaticCache), zero at the slots not written yet
                    weights = F.pad(weights, (0, past_key_values.max_cache_len - weights.shape[-1]))
                all_attn += (weights,)
        hidden_states = self.final_layernorm(hidden_states)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        if use_cache:
            past_key_values._advance(T, device)
        if static:
            past_key_values._counter.window = None
        out = MoeModelOutputWithPast(
            last_hidden_state=hidden_states,
            **{CACHE_FIELD: past_key_values if use_cache else None},
            hidden_states=all_hidden,
            attentions=all_attn,
            router_logits=router_logits,
        )
        # per MoE layer: None (every token of the layer) or the (b·T,) mask of tokens a Mixture-of-Depths
        # layer routed through it; and the layers' own auxiliary losses (MoD BCE, MoM balance)
        out.router_masks = router_masks
        out.layer_aux_loss = torch.stack(aux_losses).sum() if aux_losses else None
        return out if return_dict else out.to_tuple()


def _use_return_dict(config) -> bool:
    return bool(getattr(config, "return_dict", True))


class MixConForCausalLM(MixConPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MixConConfig):
        super().__init__(config)
        self.model = MixConModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    # ------------------------------------------------------------------ generate: the static cache
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """``cache_implementation="static"`` builds a static `MixConCache` (fixed shapes: generate then
        compiles the decode step on an accelerator, see `_valid_auto_compile_criteria`); anything else is
        transformers' own handling (the model builds its dynamic cache in forward)."""
        impl = generation_config.cache_implementation
        if impl is None and _auto_static(self.device, generation_config, model_kwargs):
            impl = "static"  # the fast path by default on a GPU (see `_auto_static`)
        if (impl is None or impl == "dynamic" or _given_cache(model_kwargs) is not None
                or generation_config.use_cache is False):
            if impl == "dynamic":  # the default: not worth transformers' "ignored" warning
                generation_config.cache_implementation = None
                try:
                    return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
                finally:
                    generation_config.cache_implementation = impl
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if impl != "static":
            raise ValueError(f"cache_implementation={impl!r} is not supported by MixCon; use 'static' (buffers "
                             "allocated once, compiled decode) or 'dynamic' (the default)")
        # the arguments by name: their order differs across transformers 5.x
        params = inspect.signature(super()._prepare_cache_for_generation).bind(
            generation_config, model_kwargs, *args, **kwargs).arguments
        batch = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1) * params["batch_size"]
        length = max(params["max_cache_length"], getattr(generation_config, "max_cache_len", None) or 0)
        # reuse the largest length seen so far, so that a later call does not recompile the decode step
        length = max(length, getattr(self, "_previous_max_cache_length", -1))
        self._previous_max_cache_length = length
        model_kwargs[GENERATE_CACHE_KEY] = MixConCache(self.config, max_cache_len=length, batch_size=batch,
                                                       device=self.device)

    def create_masks_for_generate(self, config=None, inputs_embeds=None, attention_mask=None, past_key_values=None,
                                  position_ids=None, cache=None, **kwargs):
        """What generate's `prepare_inputs_for_generation` passes for a compileable (static) cache: the
        2-D padding mask widened to (batch, max_cache_len) with zeros, a shape that no longer changes
        between tokens (the model builds its attention mask from it and the cache's device counter)."""
        past_key_values = resolve_cache(cache, past_key_values)
        if attention_mask is None or attention_mask.dim() != 2 or not is_static_cache(past_key_values):
            return attention_mask
        M = past_key_values.max_cache_len
        if attention_mask.shape[1] > M:
            raise ValueError(f"attention_mask covers {attention_mask.shape[1]} tokens, more than the static "
                             f"cache's max_cache_len={M}")
        return F.pad(attention_mask, (0, M - attention_mask.shape[1]))

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[MixConCache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_router_logits: Optional[bool] = None,
        cache: Optional[MixConCache] = None,
        cache_params: Optional[MixConCache] = None,
        shift_labels: Optional[torch.LongTensor] = None,
        num_items_in_batch: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast | tuple:
        """Returns logits, the loss (next-token cross-entropy, plus the router losses in training),
        ``aux_loss`` = router_aux_loss_coef · Switch loss + router_z_loss_coef · z-loss over
        non-padded tokens, plus the Mixture-of-Depths decision BCE and the Mixture-of-Modules balance
        loss (each with its coefficient; None when the model has none) and the per-MoE-layer router
        logits. ``aux_loss`` is returned with labels or with ``output_router_logits`` (the argument or
        the config's), else None, as in transformers' MoE models: the output's first field (``out[0]``,
        the tuple's first entry) is then the logits.

        ``labels`` (batch, time) like input_ids (−100 = no loss), shifted inside; or (batch, time + 1),
        the ids with the token after the last input. ``shift_labels`` (already shifted, as context
        parallelism gives them) replaces the shift. The cross-entropy is transformers' own causal-LM loss
        (`self.loss_function`): with ``num_items_in_batch`` (what `Trainer` passes under gradient
        accumulation) it is the sum over this batch divided by that count, and the auxiliary losses
        are weighted by this batch's share of the count, so the accumulated gradient is that of the
        whole batch."""
        check_kwargs(f"{type(self).__name__}.forward", kwargs)
        past_key_values = resolve_cache(cache, past_key_values, cache_params)
        cfg = self.config
        return_dict = _use_return_dict(cfg) if return_dict is None else return_dict
        if isinstance(logits_to_keep, bool) or not (
                (isinstance(logits_to_keep, int) and logits_to_keep >= 0)
                or (isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dim() == 1
                    and logits_to_keep.dtype in (torch.long, torch.int32))):
            raise ValueError(
                f"logits_to_keep={logits_to_keep!r}: pass an int >= 0 (0: the logits of every position, k: of the "
                "last k) or a 1-D integer tensor of the positions to keep")
        if (labels is not None or shift_labels is not None) and not (
                isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError("labels need the logits of every position: pass logits_to_keep=0 with labels")
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True,
            labels=labels, shift_labels=shift_labels,
        )
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        if output_router_logits is None:
            output_router_logits = bool(getattr(cfg, "output_router_logits", False))
        want_aux = output_router_logits or labels is not None or shift_labels is not None
        aux_loss = None
        if out.router_logits and want_aux:
            T = hidden.shape[1]
            token_mask = (attention_mask[:, -T:].reshape(-1).bool()
                          if attention_mask is not None and attention_mask.dim() == 2 else None)
            masks = [m if token_mask is None else token_mask if m is None else m & token_mask
                     for m in getattr(out, "router_masks", [None] * len(out.router_logits))]
            aux_loss = (cfg.router_aux_loss_coef
                        * load_balancing_loss(out.router_logits, cfg.experts_per_token, masks)
                        + cfg.router_z_loss_coef * router_z_loss(out.router_logits, masks))
        layer_aux = getattr(out, "layer_aux_loss", None) if want_aux else None
        if layer_aux is not None:
            aux_loss = layer_aux if aux_loss is None else aux_loss + layer_aux
        loss = None
        if labels is not None or shift_labels is not None:
            if shift_labels is None and labels.shape[1] == logits.shape[1] + 1:
                labels, shift_labels = None, labels[:, 1:].contiguous()
            if shift_labels is not None:
                shift_labels = shift_labels.contiguous()
            loss = self.loss_function(logits, labels, vocab_size=cfg.vocab_size, shift_labels=shift_labels,
                                      num_items_in_batch=num_items_in_batch)
            if aux_loss is not None and self.training:
                aux = aux_loss.to(loss.device)
                if num_items_in_batch is not None:  # this batch's share of the accumulated batch
                    target = shift_labels if shift_labels is not None else labels[:, 1:]
                    aux = aux * (target != -100).sum() / num_items_in_batch
                loss = loss + aux
        result = MoeCausalLMOutputWithPast(
            loss=loss, aux_loss=aux_loss, logits=logits, **{CACHE_FIELD: getattr(out, CACHE_FIELD)},
            hidden_states=out.hidden_states, attentions=out.attentions, router_logits=out.router_logits,
        )
        return result if return_dict else result.to_tuple()
