import pytest
import torch

from helpers import randomize_, rel_rms, tiny_config
from mixcon import MixConForCausalLM
from mixcon.layers.moe import SparseMoE
from mixcon.ops.moe import load_balancing_loss, moe_grouped, moe_loop, route, router_z_loss


def _experts(E=6, D=16, F=24, T=40, K=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    gate_up = torch.randn(E, 2 * F, D, generator=g) * 0.3
    down = torch.randn(E, D, F, generator=g) * 0.3
    logits = torch.randn(T, E, generator=g)
    logits[:, 0] -= 100  # expert 0 receives no token
    return x, gate_up, down, logits


@pytest.mark.parametrize("renorm", [True, False])
def test_grouped_matches_loop_forward_and_gradients_with_empty_experts(renorm):
    x, gate_up, down, logits = _experts()
    w, idx = route(logits, 2, renorm)
    assert not (idx == 0).any()
    ins = [t.clone().requires_grad_(True) for t in (x, gate_up, down, logits)]
    outs = []
    for fn, (xx, gu, dn, lg) in ((moe_loop, ins), (moe_grouped, [t.detach().clone().requires_grad_(True) for t in ins])):
        ww, ii = route(lg, 2, renorm)
        y = fn(xx, gu, dn, ww, ii)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append((y.detach(), [t.grad for t in (xx, gu, dn, lg)]))
    (y1, g1), (y2, g2) = outs
    assert rel_rms(y2, y1) < 1e-6
    for a, b in zip(g2, g1):
        assert rel_rms(a, b) < 1e-6
    assert g1[1][0].abs().sum() == 0 and g2[1][0].abs().sum() == 0  # the idle expert gets no gradient


def test_moe_block_matches_transformers_mixtral_block():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    xc = MixtralConfig(hidden_size=16, intermediate_size=24, num_local_experts=6, num_experts_per_tok=2)
    xc._experts_implementation = "eager"  # a bare block has no model to set it (transformers 5.0)
    ref = MixtralSparseMoeBlock(xc).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
    for impl in ("loop", "grouped"):
        ours = SparseMoE(tiny_config(hidden_size=16, intermediate_size=24, num_experts=6, experts_per_token=2,
                                     moe_impl=impl)).eval()
        ours.router.weight.data.copy_(ref.gate.weight)
        ours.experts.gate_up_proj.data.copy_(ref.experts.gate_up_proj)
        ours.experts.down_proj.data.copy_(ref.experts.down_proj)
        x = torch.randn(3, 7, 16)
        with torch.no_grad():
            y, logits = ours(x)
            assert torch.allclose(logits, x.view(-1, 16) @ ref.gate.weight.T, atol=1e-6)
            assert rel_rms(y, ref(x)) < 1e-6
        assert ours.last_expert_load.sum() == 3 * 7 * 2


def test_switch_loss_is_k_at_perfect_balance_and_larger_when_collapsed():
    E, K = 8, 2
    balanced = torch.zeros(64, E)  # uniform probabilities; top-K ties broken evenly below
    balanced[torch.arange(64), torch.arange(64) % E] = 1e-3
    balanced[torch.arange(64), (torch.arange(64) + 1) % E] = 1e-3
    assert abs(load_balancing_loss([balanced], K).item() - K) < 1e-2
    collapsed = torch.zeros(64, E)
    collapsed[:, :2] = 10.0
    assert load_balancing_loss([collapsed], K).item() > 3 * K
    assert router_z_loss([collapsed]).item() > router_z_loss([balanced]).item()


def test_aux_loss_unchanged_by_padding():
    torch.manual_seed(0)
    model = randomize_(MixConForCausalLM(tiny_config())).eval()
    V = model.config.vocab_size
    a = torch.randint(3, V, (1, 9))
    b = torch.randint(3, V, (1, 6))
    with torch.no_grad():
        la, lb = model(a, output_router_logits=True).aux_loss, model(b, output_router_logits=True).aux_loss
        ids = torch.cat([a, torch.cat([torch.randint(3, V, (1, 3)), b], 1)])  # b left-padded with junk
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        both = model(ids, attention_mask=mask, output_router_logits=True)
        ids2 = ids.clone()
        ids2[1, :3] = torch.randint(3, V, (3,))
        both2 = model(ids2, attention_mask=mask, output_router_logits=True)
    assert torch.allclose(both.aux_loss, both2.aux_loss, atol=1e-6)  # padded content does not count
    # and the pair's loss is the loss of the 15 real tokens, computed from the unpadded runs
    logits = [torch.cat([x, y]) for x, y in zip(model(a).router_logits, model(b).router_logits)]
    c = model.config
    expected = (c.router_aux_loss_coef * load_balancing_loss(logits, c.experts_per_token)
                + c.router_z_loss_coef * router_z_loss(logits))
    assert torch.allclose(both.aux_loss, expected, atol=1e-5)
    assert not torch.allclose(la, lb)


@pytest.mark.parametrize("T", [1, 3])
def test_decode_gather_path_matches_loop_and_reads_only_chosen_experts(T):
    from torch.utils._python_dispatch import TorchDispatchMode

    x, gate_up, down, logits = _experts(E=16, T=T)
    w, idx = route(logits, 2)
    ins = [t.clone().requires_grad_(True) for t in (x, gate_up, down)]
    y_ref = moe_loop(*ins, w, idx)

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            for a in args:
                if isinstance(a, torch.Tensor) and a.shape == gate_up.shape:
                    seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    args = [t.detach() for t in ins]
    with Record():
        y = moe_grouped(*args, w, idx)
    assert rel_rms(y, y_ref) < 1e-6
    # the stacked expert weights are only indexed (T·K rows), never read whole by a product
    assert seen and all(name.startswith("index") for name in seen), seen
    y2 = moe_grouped(*ins, w, idx)
    (y2 * torch.linspace(-1, 1, y2.numel()).view_as(y2)).sum().backward()
    touched = (ins[1].grad.flatten(1).abs().sum(1) > 0).nonzero().flatten().tolist()
    assert touched == sorted(set(idx.flatten().tolist()))


def test_router_jitter_only_in_training_and_only_on_the_router():
    cfg = tiny_config(router_jitter_noise=0.5)
    moe = SparseMoE(cfg)
    torch.nn.init.normal_(moe.router.weight)
    for p in (moe.experts.gate_up_proj, moe.experts.down_proj):
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 5, cfg.hidden_size)
    moe.eval()
    y1, l1 = moe(x)
    y2, l2 = moe(x)
    assert torch.equal(l1, l2) and torch.equal(y1, y2)
    moe.train()
    _, l3 = moe(x)
    assert not torch.allclose(l3, l1)
    # the experts saw clean inputs: re-running them with the jittered routing gives the same output
    torch.manual_seed(1)
    y4, l4 = moe(x)
    w, idx = route(l4, cfg.experts_per_token, cfg.moe_renormalize)
    expect = moe_loop(x.reshape(-1, cfg.hidden_size), moe.experts.gate_up_proj, moe.experts.down_proj, w, idx)
    assert rel_rms(y4.reshape(-1, cfg.hidden_size), expect) < 1e-6
    assert moe.last_expert_load.sum() == x.shape[0] * x.shape[1] * cfg.experts_per_token
