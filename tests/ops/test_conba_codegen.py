"""mixcon/ops/conba/codegen.py, the generator of chunk_algebra.py (the chunk scan's algebra): the file is
its current output (this test fails when one is edited without the other), and the generated combine
functions compose affine maps as matrices do."""

import random

import pytest

from mixcon.ops.conba import codegen


def test_chunk_algebra_is_the_generators_current_output():
    text = open(codegen.TARGET, encoding="utf-8").read()
    assert text == codegen.render(), \
        "chunk_algebra.py is out of date: run python -m mixcon.ops.conba.codegen --write"


def test_check_fails_on_a_stale_file_and_write_repairs_it(tmp_path, monkeypatch, capsys):
    text = open(codegen.TARGET, encoding="utf-8").read()
    stale = tmp_path / "chunk_algebra.py"
    stale.write_text(text.replace("c00 = b00 * a00\n", "c00 = a00 * b00\n", 1), encoding="utf-8")
    monkeypatch.setattr(codegen, "TARGET", str(stale))
    assert codegen.main(["--check"]) == 1 and "out of date" in capsys.readouterr().out
    assert codegen.main(["--write"]) == 0
    assert stale.read_text(encoding="utf-8") == text and codegen.main(["--check"]) == 0
    stale.unlink()  # a missing file is out of date, and --write creates it
    assert codegen.main(["--check"]) == 1
    assert codegen.main(["--write"]) == 0 and stale.read_text(encoding="utf-8") == text


def _plain(src):
    """The generated functions as plain Python (no Triton): a name → function dict."""
    ns = {}
    exec(src.replace("@triton.jit\n", ""), ns)  # noqa: S102 - our own generated code
    return ns


@pytest.mark.parametrize("m", codegen.ORDERS)
@pytest.mark.parametrize("nv", [1, 2])
def test_combine_is_the_composition_of_affine_maps(m, nv):
    """_comb{m}_{nv}(A, a, B, b) = (B·A, B·a + b) on random numbers, every entry."""
    f = _plain(codegen._comb(m, nv))[f"_comb{m}_{nv}"]
    rnd = random.Random(m * 10 + nv)
    A = [[rnd.uniform(-1, 1) for _ in range(m)] for _ in range(m)]
    B = [[rnd.uniform(-1, 1) for _ in range(m)] for _ in range(m)]
    a = [[rnd.uniform(-1, 1) for _ in range(m)] for _ in range(nv)]
    b = [[rnd.uniform(-1, 1) for _ in range(m)] for _ in range(nv)]
    flat = lambda M, v: [x for row in M for x in row] + [x for col in v for x in col]  # noqa: E731
    got = f(*flat(A, a), *flat(B, b))
    BA = [[sum(B[i][k] * A[k][j] for k in range(m)) for j in range(m)] for i in range(m)]
    Ba_b = [[sum(B[i][k] * a[c][k] for k in range(m)) + b[c][i] for i in range(m)] for c in range(nv)]
    assert got == pytest.approx(flat(BA, Ba_b), abs=1e-12)


@pytest.mark.parametrize("m", codegen.ORDERS)
def test_companion_layout_is_the_delay_recurrence(m):
    """The forward's companion matrix maps (h_{t-1}, …, h_{t-m}) to (a·h_{t-1} + r·h_{t-m}, h_{t-1}, …) on a
    real step (τ = m; m = 1 merges the two terms) and is the identity on a padded one; the backward's is its
    transpose."""
    vals = dict(m00=0.7, m0L=0.2, sub=1.0, dia=0.0, z=0.0)
    M = [[vals[e] for e in codegen._companion(m, False)[i * m:(i + 1) * m]] for i in range(m)]
    s = [1.0, 2.0, 3.0, 4.0][:m]
    out = [sum(M[i][k] * s[k] for k in range(m)) for i in range(m)]
    expect = [0.7 * s[0] + (0.2 * s[m - 1] if m > 1 else 0.0)] + s[:-1]
    assert out == pytest.approx(expect)
    pad = dict(vals, m00=1.0, m0L=0.0, sub=0.0, dia=1.0)
    I = [[pad[e] for e in codegen._companion(m, False)[i * m:(i + 1) * m]] for i in range(m)]  # noqa: E741
    assert I == [[1.0 if i == j else 0.0 for j in range(m)] for i in range(m)]
    T = codegen._companion(m, True)
    assert T == [codegen._companion(m, False)[j * m + i] for i in range(m) for j in range(m)]
