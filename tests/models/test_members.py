"""The dynamic-compute members: Mixture-of-Depths, Mixture-of-Modules and the sparse all-MLP.

Each is checked against an independent computation of its definition (written out here, token by
token or module by module), for cache == no cache, left padding == the row alone, generation with
and without the cache, save/load, and bad configurations.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import member_config, randomize_, tiny_config

from mixcon import MixConForCausalLM
from mixcon.layers.attention import rope_cos_sin
from mixcon.layers.mom import init_pool_from_dense, routed_linear


member = member_config


MEMBERS = {
    "mod-layer+ffn": lambda: member("mod-tiny.json", use_rope=True),
    "mod-predictor": lambda: member("mod-tiny.json", mod_decision="predictor", mod_capacity=0.3),
    "mom": lambda: member("mom-tiny.json"),
    "smlp": lambda: member("smlp-tiny.json", spatial_max_len=64),
    "smlp-learned": lambda: member("smlp-tiny.json", spatial_max_len=64, spatial_routing="learned",
                                   spatial_route_prefix=6),
    "all-kinds": lambda: tiny_config(layer_pattern="masc", mod_every=2, mod_offset=1, use_rope=True,
                                     spatial_max_len=64, mom_attn_modules=3, mom_ffn_modules=2),
}


def build(name, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return randomize_(MixConForCausalLM(MEMBERS[name]()), scale=0.1).eval().to(dtype)


@pytest.mark.parametrize("name", list(MEMBERS))
def test_cached_decoding_and_left_padding_equal_the_full_forward(name):
    model = build(name)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(3, model.config.vocab_size, (2, 24), generator=g)
    with torch.no_grad():
        full = model(x, use_cache=False).logits
        out = model(x[:, :9], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(9, 24):
            steps.append(model(x[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
        mask = torch.ones(2, 24, dtype=torch.long)
        mask[1, :5] = 0
        padded = model(x.masked_fill(mask == 0, 0), attention_mask=mask, use_cache=False).logits
        alone = model(x[1:, 5:], use_cache=False).logits
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-10
    assert (padded[1, 5:] - alone[0]).abs().max() < 1e-10
    gen_cache = model.generate(x[:, :6], max_new_tokens=8, do_sample=False, pad_token_id=0)
    gen_full = model.generate(x[:, :6], max_new_tokens=8, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(gen_cache, gen_full)


def test_mod_routed_layers_equal_the_layer_run_on_the_selected_subsequence():
    """x + σ(r)·(attention + FFN) on the selected tokens only, at their own positions, attending to
    selected tokens only; eval = causal decision σ(r) > ½; training = top ⌈C·T⌉ per row."""
    model = build("mod-layer+ffn")
    cfg = model.config
    layer = next(l for l in model.model.layers if l.mod_type == "layer")
    ffn_layer = next(l for l in model.model.layers if l.mod_type == "ffn")
    g = torch.Generator().manual_seed(2)
    b, T, D = 3, 40, cfg.hidden_size
    x = torch.randn(b, T, D, generator=g, dtype=torch.float64)
    pos = torch.arange(T)[None].expand(b, T)
    rope = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, x.dtype)
    for training in (False, True):
        layer.train(training)
        ffn_layer.train(training)
        with torch.no_grad():
            out = layer(x, rope=rope, positions=pos)[0]
            out_f = ffn_layer(x, positions=pos)[0]
        k = math.ceil(cfg.mod_capacity * T)
        for i in range(b):
            r = layer.depth_router.router(x[i]).squeeze(-1)
            sel = (r.topk(k).indices.sort().values if training else torch.nonzero(r > 0)[:, 0])
            assert 0 < len(sel) < T
            xs = x[i, sel][None]
            with torch.no_grad():
                cos, sin = rope_cos_sin(sel[None], cfg.head_dim, cfg.rope_theta, x.dtype)
                a = layer.mixer(layer.input_layernorm(xs), rope=(cos, sin))
                f = layer.feed_forward(layer.pre_ff_layernorm(xs + a))
                f = f[0] if isinstance(f, tuple) else f
            ref = x[i].clone()
            ref[sel] += torch.sigmoid(r[sel])[:, None] * (a + f)[0]
            assert (out[i] - ref).abs().max() < 1e-10, (training, i)
            # FFN-only routing (a Conba layer: the mixer sees every token, the FFN the selected ones)
            with torch.no_grad():
                h = x[i] + ffn_layer.mixer(ffn_layer.input_layernorm(x[i:i + 1]))[0]
                r = ffn_layer.depth_router.router(h).squeeze(-1)
                sel = (r.topk(k).indices.sort().values if training else torch.nonzero(r > 0)[:, 0])
                f = ffn_layer.feed_forward(ffn_layer.pre_ff_layernorm(h[sel]))
            f = f[0] if isinstance(f, tuple) else f
            ref = h.clone()
            ref[sel] += torch.sigmoid(r[sel])[:, None] * f
            assert (out_f[i] - ref).abs().max() < 1e-10, (training, i)
    assert 0.0 <= layer.depth_router.last_stats["agreement"] <= 1.0


def test_mod_training_selects_capacity_and_trains_router_and_decision():
    model = build("mod-predictor", dtype=torch.float32).train()
    x = torch.randint(3, model.config.vocab_size, (2, 32))
    out = model(x, labels=x, use_cache=False)
    routers = [l.depth_router for l in model.model.layers if hasattr(l, "depth_router")]
    assert all(r.last_stats["selected"] == pytest.approx(math.ceil(0.3 * 32) / 32) for r in routers)
    out.loss.backward()
    for r in routers:  # σ(r) scales the output, so the router learns from the LM loss
        assert r.router.weight.grad.abs().sum() > 0 and r.predictor[0].weight.grad.abs().sum() > 0
    # the predictor reads stop-gradient inputs: its BCE alone sends nothing into the trunk
    model.zero_grad()
    model.model(x, use_cache=False).layer_aux_loss.backward()
    assert model.model.embed_tokens.weight.grad is None or model.model.embed_tokens.weight.grad.abs().sum() == 0
    assert all(r.predictor[0].weight.grad.abs().sum() > 0 for r in routers)


def test_mom_round_equals_a_dense_per_token_assembly():
    """Per token: q, k, v = Σ w_k W^{m_k} x over the chosen non-SKIP modules; o convex-weighted; FFN
    Σ w_k FFN^{m_k}; written here with dense per-module weight matrices (zero where not chosen)."""
    model = build("mom")
    cfg = model.config
    pool, layer = model.model.mom_pool, model.model.layers[1]
    rnd = layer.mixer
    g = torch.Generator().manual_seed(3)
    b, T, D, H, KV, hd = 2, 11, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    x = torch.randn(b, T, D, generator=g, dtype=torch.float64)
    pos = torch.arange(T)[None].expand(b, T)
    rope = rope_cos_sin(pos, hd, cfg.rope_theta, x.dtype)
    with torch.no_grad():
        out = layer(x, rope=rope, positions=pos, mom_pool=pool)[0]

        def dense_weights(router, h, M):
            w, idx, _ = router(h.reshape(-1, D))
            dw = torch.zeros(w.shape[0], M + 1, dtype=torch.float64).scatter(1, idx, w.double())
            return dw[:, :M]  # SKIP's column dropped

        h = layer.input_layernorm(x)
        wa = dense_weights(rnd.attn_router, h, cfg.mom_attn_modules)
        hf = h.reshape(-1, D)
        proj = lambda W: torch.einsum("nm,mod,nd->no", wa, W, hf)  # noqa: E731
        q = proj(pool.q_proj).view(b, T, H, hd).transpose(1, 2)
        k = proj(pool.k_proj).view(b, T, KV, hd).transpose(1, 2)
        v = proj(pool.v_proj).view(b, T, KV, hd).transpose(1, 2)
        from mixcon.layers.attention import apply_rope

        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        rep = H // KV
        o = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True)
        o = o.transpose(1, 2).reshape(b * T, H * hd)
        wo = wa / wa.sum(-1, keepdim=True).clamp(min=1e-9)
        a = torch.einsum("nm,mdo,no->nd", wo, pool.o_proj, o).view(b, T, D)
        x1 = x + a
        h2 = layer.pre_ff_layernorm(x1)
        wf = dense_weights(rnd.ffn_router, h2, cfg.mom_ffn_modules)
        f = torch.zeros(b * T, D, dtype=torch.float64)
        for m in range(cfg.mom_ffn_modules):
            gate, up = F.linear(h2.reshape(-1, D), pool.ffn.gate_up_proj[m]).chunk(2, -1)
            f += wf[:, m:m + 1] * F.linear(F.silu(gate) * up, pool.ffn.down_proj[m])
        ref = x1 + f.view(b, T, D)
    assert (out - ref).abs().max() < 1e-10
    # SKIP adds nothing: a token that picks SKIP K times gets zeros
    w = torch.rand(4, 2, dtype=torch.float32)
    idx = torch.tensor([[2, 2], [0, 2], [1, 0], [2, 1]])
    y = routed_linear(torch.randn(4, 5, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64), w, idx)
    assert torch.all(y[0] == 0) and torch.all(y[1:].abs().sum(-1) > 0)


def test_mom_pool_from_a_dense_model_reproduces_it_when_routed_round_h_to_module_h():
    """Stage two of MoM: with the pool filled from a dense L-layer transformer (layer j → module j) and
    each round h forced to module h with weight 1, the MoM model computes the dense model."""
    torch.manual_seed(0)
    dense_cfg = member("dense-tiny.json")
    dense = randomize_(MixConForCausalLM(dense_cfg), 0.1).eval().double()
    L = dense_cfg.num_hidden_layers
    mom = MixConForCausalLM(member("mom-tiny.json", n_blocks=2, mom_attn_modules=L, mom_ffn_modules=L,
                                   mom_top_k=1)).eval().double()
    init_pool_from_dense(mom, dense)
    assert torch.equal(mom.model.mom_pool.q_proj[3], dense.model.layers[3].mixer.q_proj.weight)
    for h, layer in enumerate(mom.model.layers):
        for router in (layer.mixer.attn_router, layer.mixer.ffn_router):
            router.forward = (lambda hh: lambda x: (torch.ones(x.shape[0], 1), torch.full((x.shape[0], 1), hh),
                                                    torch.zeros(x.shape[0], L + 1)))(h)
    ids = torch.randint(3, dense_cfg.vocab_size, (2, 12))
    with torch.no_grad():
        assert (mom(ids).logits - dense(ids).logits).abs().max() < 1e-10
    # fewer modules than layers: consecutive layers are averaged into one module
    half = MixConForCausalLM(member("mom-tiny.json", mom_attn_modules=L // 2, mom_ffn_modules=L // 2)).double()
    init_pool_from_dense(half, dense)
    expect = (dense.model.layers[2].mixer.v_proj.weight + dense.model.layers[3].mixer.v_proj.weight) / 2
    assert torch.allclose(half.model.mom_pool.v_proj[1], expect)
    with pytest.raises(ValueError, match="divide"):
        init_pool_from_dense(MixConForCausalLM(member("mom-tiny.json", mom_attn_modules=3)), dense)
    with pytest.raises(ValueError, match="dense transformer"):
        init_pool_from_dense(half, build("mom"))


@pytest.mark.parametrize("routing", ["deterministic", "learned"])
def test_spatial_mixer_equals_its_formula_token_by_token(routing):
    model = build("smlp-learned" if routing == "learned" else "smlp")
    mixer = model.model.layers[3].mixer  # a sparse layer (4 experts)
    assert mixer.n_experts == 4 and model.model.layers[0].mixer.n_experts == 1
    g = torch.Generator().manual_seed(4)
    b, T, Dm = 2, 14, model.config.hidden_size
    x = torch.randn(b, T, Dm, generator=g, dtype=torch.float64)
    pos = torch.arange(T)[None].expand(b, T)
    with torch.no_grad():
        out = mixer(x, pos)
        u, v = F.gelu(mixer.in_proj(x)).chunk(2, -1)
        v = mixer.norm(v)
        W, E = v.shape[-1], mixer.n_experts
        det = torch.arange(W) // (W // E)
        ref = torch.empty_like(u)
        for i in range(b):
            expert, gate = det, torch.ones(W, dtype=torch.float64)
            if routing == "learned":
                probs = torch.softmax(mixer.router(v[i, :mixer.prefix].T), -1)  # each feature's prefix values
                gate, expert = probs.max(-1)
            for t in range(T):
                e, gt = (expert, gate) if routing == "learned" and t >= mixer.prefix else (det, torch.ones(W))
                for c in range(W):
                    s = sum(mixer.spatial_weight[e[c], t, j] * v[i, j, c] for j in range(t + 1))
                    ref[i, t, c] = gt[c] * s + mixer.spatial_bias[e[c], t]
        ref = mixer.out_proj(u * ref)
    assert (out - ref).abs().max() < 1e-10


def test_mom_and_mod_and_spatial_save_and_load(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build("all-kinds", dtype=torch.float32)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    sd, sl = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sl.keys() and all(torch.equal(sd[k], sl[k]) for k in sd)
    ids = torch.randint(3, model.config.vocab_size, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert loaded.config.layers_mod_type == model.config.layers_mod_type


@pytest.mark.parametrize("kw, msg", [
    (dict(layer_pattern="acxz"), "layer_pattern"),
    (dict(layer_pattern="mmmm", moe_every=0, mom_top_k=9, mom_attn_modules=2), "mom_top_k"),
    (dict(layer_pattern="mmmm", moe_every=2), "place no MoE layer"),
    (dict(layer_pattern="ssss", spatial_experts=5), "spatial_experts"),
    (dict(layer_pattern="ssss", spatial_routing="soft"), "spatial_routing"),
    (dict(mod_every=2, mod_capacity=0.0), "mod_capacity"),
    (dict(mod_every=2, mod_decision="oracle"), "mod_decision"),
    (dict(layer_pattern="cccc", intermediate_size=0, moe_every=0, mod_every=2), "route no layer"),
    (dict(layer_pattern="mmmm", intermediate_size=0, moe_every=0), "intermediate_size"),
    (dict(dense_layers=99), "dense_layers"),
])
def test_bad_member_configs_name_the_field(kw, msg):
    with pytest.raises(ValueError, match=msg):
        tiny_config(**kw)


def test_spatial_context_beyond_its_weights_raises():
    model = MixConForCausalLM(member("smlp-tiny.json", spatial_max_len=16))
    with pytest.raises(ValueError, match="spatial_max_len=16"):
        model(torch.randint(3, 100, (1, 17)))


@pytest.mark.parametrize("name", ["mom", "smlp", "all-kinds"])
def test_cache_nbytes_from_config_equals_the_cache_held(name):
    from mixcon.models.configuration_mixcon import cache_nbytes

    model = build(name, dtype=torch.float32)
    if name == "all-kinds":  # every token selected by the MoD layers (r = 1): the bound is reached
        assert "layer" in model.config.layers_mod_type
        for layer in model.model.layers:
            if hasattr(layer, "depth_router"):
                layer.depth_router.router = torch.nn.Linear(model.config.hidden_size, 1)
                torch.nn.init.zeros_(layer.depth_router.router.weight)
                torch.nn.init.ones_(layer.depth_router.router.bias)
    ids = torch.randint(3, model.config.vocab_size, (3, 13))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    assert cache.nbytes() == cache_nbytes(model.config, 13, batch=3, dtype=torch.float32)["total"]


def test_router_logits_of_a_routed_moe_layer_land_on_the_selected_tokens_only():
    """Rows select different numbers of tokens; the empty slots (pointing at position 0) must not
    overwrite a selected token's router logits, and the loss mask marks exactly the selected tokens."""
    cfg = tiny_config(layer_pattern="cccc", mod_every=2, mod_offset=1)  # odd layers: Conba + routed MoE FFN
    model = randomize_(MixConForCausalLM(cfg), 0.1).eval().double()
    layer = model.model.layers[1]
    assert layer.mod_type == "ffn" and layer.ffn_type == "moe"
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 12, cfg.hidden_size, generator=g, dtype=torch.float64)
    pos = torch.arange(12)[None].expand(2, 12)
    with torch.no_grad():
        h = x + layer.mixer(layer.input_layernorm(x))
        r = layer.depth_router.router(h).squeeze(-1)
        r[0] = torch.linspace(1.0, -1.0, 12)  # row 0 selects positions 0..5: two empty slots (→ position 0)
        r[1] = torch.tensor([-1, 1, 1, 1, -1, 1, 1, 1, 1, -1, 1, -1.0])  # row 1 selects 8, not position 0
        layer.depth_router.router.forward = lambda inp: r[..., None]
        _, logits, mask, _, _ = layer(x, positions=pos)
        expect = layer.feed_forward.router(layer.pre_ff_layernorm(h)).reshape(24, -1)
    sel = (r > 0).reshape(-1)
    assert sel[:6].all() and not sel[6:12].any() and sel[12:].sum() == 8
    assert torch.equal(mask, sel)
    assert (logits[sel] - expect[sel]).abs().max() < 1e-12 and torch.all(logits[~sel] == 0)
