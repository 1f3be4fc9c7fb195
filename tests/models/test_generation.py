"""generate() judged by equality, on every tiny member of the family, at whichever transformers is installed.

transformers' sdist does not ship its generation tests (`GenerationTesterMixin`), so these are what
covers generate. Each compares generate with what the model itself says when run without a cache:
the argmax (or the sample, the beam score) of a full uncached forward over the whole sequence so far,
token by token. A model that received no cache on a decode step (what transformers ≥ 5.24 did to a
model reading only ``past_key_values``) would see one token with no history and fail every one.

Members: configs/*tiny*.json and the Jamba, Mamba-1 and Mixtral special cases at tiny size, in
float64 (so that cached and uncached logits agree to ~1e-12 and no argmax tie can flip). Control
periods of 3 tokens: every sequence here is at least 12 tokens long, so the controller samples at
least four times inside it, on both sides of the prefill/decode split.
"""

import functools

import pytest
import torch

from helpers import member_config, randomize_

from mixcon import MixConCache, MixConForCausalLM
from mixcon.models.compat import GENERATE_CACHE_KEY, output_cache

P = 3  # control period: acts inside these sequences
NEW = 10  # new tokens; the shortest prompt (2 tokens) + NEW >= 4 * P
PROMPTS = (9, 5, 2)  # a left-padded batch of three prompts of different lengths

_SPECIAL = dict(n_blocks=1, layers_per_block=4)
MEMBERS = {
    "tiny": lambda: member_config("tiny.json", control_period=P),
    "dense-tiny": lambda: member_config("dense-tiny.json"),
    "mod-tiny": lambda: member_config("mod-tiny.json", control_period=P),
    "mom-tiny": lambda: member_config("mom-tiny.json"),
    "smlp-tiny": lambda: member_config("smlp-tiny.json", spatial_max_len=64),
    # the special cases of docs/architecture.md
    "jamba": lambda: member_config("tiny.json", **_SPECIAL, attn_ratio="1:3", selection="linear", ssm_norm=True,
                                   delay=0, state_scaling=False, control=False, moe_renormalize=False),
    "mamba": lambda: member_config("tiny.json", **_SPECIAL, attn_ratio="0:4", moe_every=0, intermediate_size=0,
                                   selection="linear", delay=0, state_scaling=False, control=False),
    "mixtral": lambda: member_config("tiny.json", **_SPECIAL, attn_ratio="4:0", moe_every=1, moe_offset=0,
                                     use_rope=True),
}

_MODELS = {}


def model_for(name):
    if name not in _MODELS:
        torch.manual_seed(0)
        cfg = MEMBERS[name]()
        cfg.pad_token_id = 0
        _MODELS[name] = randomize_(MixConForCausalLM(cfg), scale=0.1).to(torch.float64).eval()
    return _MODELS[name]


def prompts(model, lengths=PROMPTS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]


def left_pad(seqs):
    L = max(map(len, seqs))
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):] = torch.tensor(s)
        mask[i, L - len(s):] = 1
    return ids, mask


@torch.no_grad()
def uncached_logits(model, seq):
    """The logits of one full forward over ``seq`` (a list of ids) without a cache."""
    return model(torch.tensor([seq]), use_cache=False).logits[0]


@functools.lru_cache(maxsize=None)
def _greedy_reference(name, prompt):
    model = model_for(name)
    seq = list(prompt)
    for _ in range(NEW):
        seq.append(int(uncached_logits(model, seq)[-1].argmax()))
    return seq[len(prompt):]


def greedy_reference(name, prompt):
    """The NEW-token argmax continuation of ``prompt`` by uncached forwards of member ``name``
    (computed once per member and prompt: several tests compare with it)."""
    return _greedy_reference(name, tuple(prompt))


# every generated token counts: no early stop at an end-of-sequence token
KW = dict(max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", list(MEMBERS))
def test_greedy_equals_argmax_of_uncached_forwards(name, cache):
    model = model_for(name)
    (p,) = prompts(model, (PROMPTS[0],))
    out = model.generate(torch.tensor([p]), do_sample=False, cache_implementation=cache,
                         return_dict_in_generate=True, **KW)
    held = output_cache(out)
    assert isinstance(held, MixConCache) and held.is_static == (cache == "static")
    assert out.sequences[0, len(p):].tolist() == greedy_reference(name, p)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", list(MEMBERS))
def test_left_padded_batch_equals_argmax_of_each_prompt_alone(name, cache):
    model = model_for(name)
    ps = prompts(model)
    ids, mask = left_pad(ps)
    out = model.generate(ids, attention_mask=mask, do_sample=False, cache_implementation=cache, **KW)
    for i, p in enumerate(ps):
        assert out[i, ids.shape[1]:].tolist() == greedy_reference(name, p), f"row {i} (prompt of {len(p)})"


@pytest.mark.parametrize("name", list(MEMBERS))
def test_beam_search_scores_equal_uncached_scoring(name):
    """Two beams: each returned sequence's score is its generated tokens' log-probability under one
    uncached forward (length penalty 1: divided by the number of generated tokens), and the winner
    scores at least as high as the runner-up. Beam search reorders the Conba states between beams; a
    state left with the wrong beam changes these scores."""
    model = model_for(name)
    (p,) = prompts(model, (PROMPTS[1],))
    out = model.generate(torch.tensor([p]), num_beams=2, num_return_sequences=2, do_sample=False,
                         length_penalty=1.0, output_scores=True, return_dict_in_generate=True, **KW)
    scores = []
    for seq in out.sequences.tolist():
        logp = torch.log_softmax(uncached_logits(model, seq).float(), -1)
        scores.append(sum(logp[t - 1, seq[t]].item() for t in range(len(p), len(seq))) / NEW)
    assert torch.allclose(out.sequences_scores.double(), torch.tensor(scores, dtype=torch.float64), atol=1e-5), (
        out.sequences_scores.tolist(), scores)
    assert scores[0] >= scores[1] - 1e-6
    # the same search without a cache picks the same beams
    plain = model.generate(torch.tensor([p]), num_beams=2, num_return_sequences=2, do_sample=False,
                           use_cache=False, **KW)
    assert torch.equal(plain, out.sequences)


@pytest.mark.parametrize("name", list(MEMBERS))
def test_sampling_equals_sampling_from_uncached_logits(name):
    """do_sample with a fixed seed draws what torch.multinomial draws from the softmax of the uncached
    logits (in float32, as generate takes them) with the same generator state."""
    model = model_for(name)
    (p,) = prompts(model, (PROMPTS[1],))
    torch.manual_seed(7)
    got = model.generate(torch.tensor([p]), do_sample=True, top_k=0, top_p=1.0, temperature=1.0, **KW)
    torch.manual_seed(7)
    seq = list(p)
    for _ in range(NEW):
        probs = torch.softmax(uncached_logits(model, seq)[-1].float(), -1)
        seq.append(int(torch.multinomial(probs[None], num_samples=1)))
    assert got[0].tolist() == seq


@pytest.mark.parametrize("name", list(MEMBERS))
def test_continuing_a_generate_from_its_returned_cache(name):
    model = model_for(name)
    (p,) = prompts(model, (PROMPTS[1],))
    half = NEW // 2
    first = model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=half, min_new_tokens=half,
                           pad_token_id=0, return_dict_in_generate=True)
    cache = output_cache(first)
    assert isinstance(cache, MixConCache) and cache.get_seq_length() == len(p) + half - 1
    more = model.generate(first.sequences, do_sample=False, max_new_tokens=NEW - half, min_new_tokens=NEW - half,
                          pad_token_id=0, **{GENERATE_CACHE_KEY: cache})
    assert more[0, len(p):].tolist() == greedy_reference(name, p)


@pytest.mark.parametrize("name", ["cache", "past_key_values", "cache_params"])
def test_forward_takes_the_cache_under_each_name_and_returns_it_where_generate_reads_it(name):
    """A prefill then a decode step with the cache passed as ``name`` gives the logits of one uncached
    forward over the whole sequence; the output holds the cache in the installed transformers' field."""
    from mixcon.models.compat import CACHE_FIELD

    model = model_for("tiny")
    (p,) = prompts(model, (4 * P + 1,))
    with torch.no_grad():
        out = model(torch.tensor([p[:-1]]), use_cache=True)
        cache = getattr(out, CACHE_FIELD)
        assert isinstance(cache, MixConCache) and cache.get_seq_length() == len(p) - 1
        step = model(torch.tensor([p[-1:]]), use_cache=True, **{name: cache})
    assert getattr(step, CACHE_FIELD) is cache and cache.get_seq_length() == len(p)
    # the cache keeps Conba's state in float32 whatever the model's dtype: agreement to float32's precision
    torch.testing.assert_close(step.logits[0, -1], uncached_logits(model, p)[-1], rtol=1e-5, atol=1e-5)


def test_unknown_keyword_arguments_raise_instead_of_being_swallowed():
    model = model_for("tiny")
    ids = torch.tensor([prompts(model, (5,))[0]])
    for target in (model, model.model):
        with pytest.raises(TypeError, match="'past_key_value'"):  # a misspelt cache: would decode without history
            target(ids, past_key_value=MixConCache(model.config))
    with pytest.raises(ValueError, match="two different caches"):
        model(ids, cache=MixConCache(model.config), past_key_values=MixConCache(model.config))
    # what transformers documents for every forward (attention backends, outputs) passes through
    model(ids, output_router_logits=True, cu_seq_lens_q=None, max_length_q=None)
