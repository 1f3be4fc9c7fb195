"""Loading a saved MixCon with its tokenizer, and generating from it (`mixcon generate`)."""

from __future__ import annotations

import os

import torch

from mixcon.resources import UsageError


def check_model_dir(path: str) -> None:
    """A save_pretrained MixCon directory with its tokenizer, or a UsageError saying what is missing."""
    if not os.path.isdir(path):
        hint = " (a training run writes OUT/model)" if os.path.isdir(os.path.join(path + "", "..")) else ""
        raise UsageError(f"model {path!r} is not a directory; give a save_pretrained directory{hint}")
    if not os.path.exists(os.path.join(path, "config.json")):
        sub = os.path.join(path, "model")
        hint = f" — did you mean {sub!r} (a training run's model)?" if os.path.exists(
            os.path.join(sub, "config.json")) else ""
        raise UsageError(f"model {path!r} has no config.json: not a save_pretrained directory{hint}")
    if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model")):
        raise UsageError(f"model {path!r} has no tokenizer (tokenizer.json); save one beside the model "
                         f"(`mixcon export ... --tokenizer DIR`)")


def load(path: str, dtype: torch.dtype | None = None, device: str | None = None):
    """(model, tokenizer) of a save_pretrained directory; the model in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mixcon  # noqa: F401  (registers the Auto classes: no remote code, no prompt)

    check_model_dir(path)
    tok = AutoTokenizer.from_pretrained(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (ValueError, OSError) as exc:
        raise UsageError(f"model {path!r} does not load: {str(exc).splitlines()[0]}") from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tok


def sample(model, tok, prompt: str, max_new_tokens: int = 48, temperature: float = 0.8, top_p: float = 0.95,
           static: bool = False, streamer=None) -> str:
    """The prompt and its continuation; ``temperature`` 0 = greedy; ``static``: the static cache."""
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)
    if ids.shape[1] == 0:
        raise UsageError("the prompt is empty: give at least one character of text")
    kw = dict(do_sample=False) if temperature == 0 else dict(do_sample=True, temperature=temperature, top_p=top_p,
                                                             repetition_penalty=1.2)
    kw["cache_implementation"] = "static" if static else "dynamic"
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             pad_token_id=tok.pad_token_id, streamer=streamer, **kw)
    return tok.decode(out[0], skip_special_tokens=True)


def stream(path: str, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8, static: bool = False,
           seed: int = 0) -> str:
    """Load ``path`` and print the prompt's continuation as it is generated; returns the whole text."""
    from transformers import TextStreamer

    if not prompt:
        raise UsageError("the prompt is empty: give at least one character of text")
    model, tok = load(path)
    torch.manual_seed(seed)
    streamer = TextStreamer(tok, skip_prompt=False, skip_special_tokens=True)
    return sample(model, tok, prompt, max_new_tokens=max_new_tokens, temperature=temperature, static=static,
                  streamer=streamer)
