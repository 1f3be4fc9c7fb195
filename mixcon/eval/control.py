"""Instruments for Conba's controller: does the output feedback change what a layer computes?

For one Conba layer and its input hidden states, `mixer_signals` runs the layer's own parameters through
the float64-capable reference loop (`mixcon.ops.conba.naive.conba_scan_ref`) twice: with the controller
as configured ("on") and with the same parameters and f ≡ 0 ("off": no gain, no feedback). It reports

* ``effect``: rms(out_on − out_off) / rms(out_on), out = the layer's output (after the gate and out_proj):
  the share of the layer's output that the feedback is responsible for;
* ``effect_pre``: the same ratio on y before the gate z and out_proj (the scan's own output);
* ``feedback``: rms(f) / rms(u) over the steps after the first sampling instant (t >= P): the size of the
  control signal beside the input it is subtracted from;
* the gain's trajectory per group (``k``: start k(0), end k(T), max_t |k(t) − k(0)|, batch mean and max);
* ``tracking_error``: rms(e), e_t = y_t − w_r·u_t;
* ``state_share``: rms(y − D·u) / rms(y) before the gate, the part of the scan's output that passes
  through the state — the only path by which f (subtracted from the state's input) reaches the output.

`model_signals` captures every Conba layer's input in one forward of a model and instruments each;
`plot_signals` draws, per layer, the gains over time and the per-position feedback share. The controller's studies
(`mixcon study control`, `mixcon.eval.control_study`) record these at initialisation and after training.
"""

from __future__ import annotations

import math

import torch


CONTROL_KEYS = ("k0", "eta", "lam", "w_r")  # the controller's parameters: None turns it off


def _rms(t: torch.Tensor) -> float:
    return t.double().pow(2).mean().sqrt().item() if t.numel() else float("nan")


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")


@torch.no_grad()
def mixer_signals(mixer, x: torch.Tensor, control_period: int | None = None, dtype=torch.float64) -> dict:
    """The controller's signals of one `ConbaMixer` on its input hidden states ``x`` (b, T, hidden).

    ``control_period`` overrides the layer's P (η, λ stay the layer's). The scan runs in ``dtype``
    (float64: the reference loop as the float64 oracle). The layer must have ``control=True``.
    Returns a dict of floats and, under ``"series"``, per-step tensors (on the CPU, float64):
    ``k`` (b, T + 1, groups), ``f``, ``u``, ``e`` (b, T, d_inner), ``diff`` and ``out`` (b, T, hidden)."""
    from mixcon.ops.conba.naive import conba_scan_ref
    from mixcon.ops.conv import causal_conv1d

    if not mixer.control:
        raise ValueError(f"layer {mixer.layer_idx} has control=False: there is no controller to instrument")
    was_training = mixer.training
    mixer.eval()  # no training noise: on and off see the same scan
    try:
        x = x.to(mixer.in_proj.weight.dtype)
        u, z = mixer.in_proj(x).chunk(2, dim=-1)
        u = causal_conv1d(u, mixer.conv1d.weight[:, 0, :], mixer.conv1d.bias, activation="silu")
        x = mixer._scan_params(u)
    finally:
        mixer.train(was_training)
    cast = lambda v: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v  # noqa: E731
    params = x.pop("params")
    P = int(control_period or params.control_period)
    p = params.replace(**{k: cast(v) for k, v in params.as_kwargs().items() if k != "control_period"},
                       control_period=P)
    x = {k: cast(v) for k, v in x.items()}  # delta, B, C and alpha
    u64, z64 = u.to(dtype), z.to(dtype)
    y_on, sig = conba_scan_ref(u64, params=p, z=z64, return_internals=True, **x)
    off = p.replace(**dict.fromkeys(CONTROL_KEYS), control_period=1)  # f ≡ 0: no gain, no feedback
    y_off, sig_off = conba_scan_ref(u64, params=off, z=z64, return_internals=True, **x)
    W = mixer.out_proj.weight.to(dtype)
    bias = mixer.out_proj.bias.to(dtype) if mixer.out_proj.bias is not None else None
    out_on = torch.nn.functional.linear(y_on, W, bias)
    out_off = torch.nn.functional.linear(y_off, W, bias)
    diff = out_on - out_off
    k = sig["k"]
    dk = (k - k[:, :1]).abs()
    T = u.shape[1]
    f_after = sig["f"][:, P:] if T > P else sig["f"][:, :0]
    u_after = u64[:, P:] if T > P else u64[:, :0]
    return dict(
        layer=mixer.layer_idx, control_period=P, tokens=T, groups=k.shape[-1],
        effect=_ratio(_rms(diff), _rms(out_on)),
        effect_pre=_ratio(_rms(sig["y_ssm"] - sig_off["y_ssm"]), _rms(sig["y_ssm"])),
        feedback=_ratio(_rms(f_after), _rms(u_after)),
        feedback_all=_ratio(_rms(sig["f"]), _rms(u64)),
        tracking_error=_rms(sig["e"]),
        state_share=_ratio(_rms(sig["y_ssm"] - p.D * u64), _rms(sig["y_ssm"])),
        output_rms=_rms(out_on),
        k_start=k[:, 0].mean().item(), k_end=k[:, -1].mean().item(),
        k_end_max=k[:, -1].max().item(), k_max_dev=dk.max().item(), k_mean_dev=dk.mean().item(),
        eta=p.eta.mean().item(), lam=p.lam.mean().item(), k0=p.k0.mean().item(),
        w_r_rms=_rms(p.w_r), D_rms=_rms(p.D), k_max=float(p.k_max),
        series=dict(k=k.cpu(), f=sig["f"].cpu(), u=u64.cpu(), e=sig["e"].cpu(), diff=diff.cpu(), out=out_on.cpu()),
    )


def conba_mixers(model) -> list:
    """The Conba mixers of a MixCon model, in layer order."""
    from mixcon.layers.conba import ConbaMixer

    return [m for m in model.modules() if isinstance(m, ConbaMixer)]


@torch.no_grad()
def model_signals(model, input_ids: torch.Tensor, control_period: int | None = None, dtype=torch.float64) -> list:
    """`mixer_signals` of every Conba layer with control of ``model`` on ``input_ids`` (one forward in
    eval mode captures each layer's input hidden states)."""
    mixers = [m for m in conba_mixers(model) if m.control]
    inputs = {}

    def hook(mod, args, kwargs):
        inputs[mod.layer_idx] = (args[0] if args else kwargs["x"]).detach()

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in mixers]
    was_training = model.training
    try:
        model.eval()
        model(input_ids, use_cache=False)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return [mixer_signals(m, inputs[m.layer_idx], control_period, dtype) for m in mixers]


def summary_row(sig: dict) -> dict:
    """The scalar part of a `mixer_signals` result (for json/csv)."""
    return {k: v for k, v in sig.items() if k != "series"}


def _per_position(t: torch.Tensor) -> torch.Tensor:
    """rms over batch and channels at each position: (b, T, c) → (T,)."""
    return t.double().pow(2).mean(dim=(0, 2)).sqrt()


def plot_signals(signals: list, path: str, title: str) -> None:
    """One row per layer: the gain of every group over time (batch mean), and per position
    rms(f)/rms(u) and rms(out_on − out_off)/rms(out_on). Nothing when matplotlib is missing."""
    from mixcon.eval import grid

    plt = grid.pyplot()
    if plt is None or not signals:
        return
    fig, axes = plt.subplots(len(signals), 2, figsize=(10, 2.6 * len(signals)), squeeze=False)
    for row, sig in zip(axes, signals):
        s = sig["series"]
        k = s["k"].mean(0)  # (T + 1, groups)
        row[0].plot(range(k.shape[0]), k.numpy(), lw=0.7)
        row[0].set_title(f"layer {sig['layer']}: gain k per group (P = {sig['control_period']})", fontsize=8)
        row[0].set_xlabel("position")
        row[0].set_ylabel("k")
        pos = torch.arange(s["f"].shape[1])
        den_u, den_o = _per_position(s["u"]).clamp_min(1e-30), _per_position(s["out"]).clamp_min(1e-30)
        row[1].plot(pos, (_per_position(s["f"]) / den_u).numpy(), lw=0.8, label="rms(f) / rms(u)")
        row[1].plot(pos, (_per_position(s["diff"]) / den_o).numpy(), lw=0.8,
                    label="rms(out − out[f≡0]) / rms(out)")
        row[1].set_yscale("symlog", linthresh=1e-4)
        row[1].set_title(f"layer {sig['layer']}: feedback share (effect {sig['effect']:.2e})", fontsize=8)
        row[1].set_xlabel("position")
        row[1].legend(fontsize=6)
        for ax in row:
            ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    grid.save_figure(fig, path)


def format_table(rows: list) -> str:
    """A markdown table of `summary_row`s (plus any leading label columns the rows carry)."""
    cols = [c for c in rows[0] if c not in ("groups", "tokens")] if rows else []
    out = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) and math.isfinite(r[c])
                                     else str(r[c]) for c in cols) + " |")
    return "\n".join(out)
