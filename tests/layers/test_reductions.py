"""Special cases of the family against transformers' own implementations, weights copied."""

import torch

from helpers import randomize_, tiny_config
from mixcon import MixConForCausalLM


def test_mamba_lm_equals_transformers_mamba():
    """attn_ratio 0:8, no FFN, mechanisms off, linear selection: a Mamba-1 LM, weights one to one."""
    from transformers import MambaConfig, MambaForCausalLM

    mc = MambaConfig(vocab_size=101, hidden_size=32, state_size=8, num_hidden_layers=8, expand=2, conv_kernel=4,
                     use_bias=False, use_conv_bias=True, layer_norm_epsilon=1e-5, tie_word_embeddings=True)
    torch.manual_seed(0)
    mamba = randomize_(MambaForCausalLM(mc), scale=0.2).eval()
    cfg = tiny_config(vocab_size=101, hidden_size=32, intermediate_size=0, n_blocks=1, layers_per_block=8,
                      attn_ratio="0:8", moe_every=0, d_state=8, selection="linear", delay=0, control=False,
                      state_scaling=False, tie_word_embeddings=True, rms_norm_eps=1e-5, dt_rank=mc.time_step_rank)
    ours = MixConForCausalLM(cfg).eval()
    sd = {}
    for k, v in mamba.state_dict().items():
        k = k.replace("backbone.embeddings", "model.embed_tokens").replace("backbone.norm_f", "model.final_layernorm")
        k = k.replace("backbone.layers", "model.layers").replace(".norm.", ".input_layernorm.")
        sd[k] = v
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ours.tie_weights()
    ids = torch.randint(0, 101, (2, 17))
    with torch.no_grad():
        a, b = mamba(ids).logits, ours(ids).logits
    assert (a - b).abs().max() < 1e-4 * a.abs().max()


def test_mixtral_shaped_model_equals_transformers_mixtral():
    """attn_ratio 8:0 with an MoE in every layer and RoPE: Mixtral, weights one to one."""
    from transformers import MixtralConfig, MixtralForCausalLM

    xc = MixtralConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                       rope_theta=10000.0, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    mixtral = randomize_(MixtralForCausalLM(xc), scale=0.2).eval()
    cfg = tiny_config(vocab_size=101, hidden_size=32, intermediate_size=48, n_blocks=1, layers_per_block=4,
                      attn_ratio="4:0", moe_every=1, moe_offset=0, num_experts=4, experts_per_token=2,
                      num_attention_heads=4, num_key_value_heads=2, use_rope=True, rope_theta=10000.0,
                      max_position_embeddings=256, rms_norm_eps=1e-5)
    ours = MixConForCausalLM(cfg).eval()
    sd = {}
    for k, v in mixtral.state_dict().items():
        k = k.replace(".self_attn.", ".mixer.").replace(".post_attention_layernorm.", ".pre_ff_layernorm.")
        k = k.replace(".mlp.gate.weight", ".feed_forward.router.weight").replace(".mlp.experts.", ".feed_forward.experts.")
        k = k.replace("model.norm.", "model.final_layernorm.")
        sd[k] = v
    ours.load_state_dict(sd, strict=True)
    ids = torch.randint(0, 101, (2, 15))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        a, b = mixtral(ids).logits, ours(ids).logits
        assert (a - b).abs().max() < 1e-4 * a.abs().max()
        a, b = mixtral(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
        assert (a[mask.bool()] - b[mask.bool()]).abs().max() < 1e-4 * a.abs().max()
