"""Property-based tests (hypothesis) of cross_attention, BlockMask and ws_linear against a
float64 oracle, on every backend variant that runs here (tests/fuzz_harness.py).

Draws: shapes (0, 1, primes, up to a few thousand), strides (transposed, sliced, expanded
with stride 0), dtypes, input amplitudes up to 30, every broadcast pattern of
``attn_mask`` (bool, float, float with gradient, -inf entries, handed over pre-expanded),
key padding, causal, block masks of every constructor (rectangular blocks, lengths that
are not multiples, blocks larger than the sequence, ``|`` / ``&``), GQA ratios, head dims
up to 256, dropout seeds, returned weights and lse.

Cases per op and run: 300 (fixed seed, so CI is reproducible); ``MMATTN_FUZZ=long``:
5000 with a random seed; ``MMATTN_FUZZ_EXAMPLES=n`` / ``MMATTN_FUZZ_SEED=s`` override.
Failures print a one-line ``python -c`` reproducer; shrinking (slow: every step runs
every backend) only with ``MMATTN_FUZZ_SHRINK=1``. ``MMATTN_FUZZ_REPORT=path`` writes
the error statistics; ``python tests/fuzz_harness.py path`` prints the ratio table.
"""

from __future__ import annotations

import math
import os

import fuzz_harness as harness
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

LONG = os.environ.get("MMATTN_FUZZ", "") == "long"
EXAMPLES = int(os.environ.get("MMATTN_FUZZ_EXAMPLES", 5000 if LONG else 300))
SEED = os.environ.get("MMATTN_FUZZ_SEED")
PHASES = [Phase.explicit, Phase.reuse, Phase.generate]
if os.environ.get("MMATTN_FUZZ_SHRINK", "") not in ("", "0"):
    PHASES.append(Phase.shrink)


def fuzz_settings(examples: int = EXAMPLES):
    decorator = settings(max_examples=examples, deadline=None, database=None,
                         derandomize=not LONG and SEED is None, phases=PHASES,
                         suppress_health_check=list(HealthCheck), print_blob=False)
    if SEED is None:
        return decorator

    def both(fn):
        return hypothesis.seed(int(SEED))(decorator(fn))
    return both


# Lengths: mostly small (the cases must be many), primes and powers of two around tile
# sizes, a few thousand now and then.
LENGTHS = st.sampled_from([0, 1, 1, 2, 3, 5, 7, 8, 13, 16, 17, 1, 2, 3, 7, 13] * 3
                          + [31, 32, 33, 63, 64, 65, 97, 127, 128, 129, 257] * 2
                          + [521, 1000, 1031, 2048, 3001])
HEAD_DIMS = [1, 2, 3, 4, 7, 8, 16, 17, 31, 32, 33, 64, 80, 96, 127, 128, 129, 255, 256]
DTYPES = st.sampled_from(["float32", "float32", "float32", "bfloat16", "float16", "float64"])
AMPLITUDES = st.sampled_from([1.0, 3.0, 6.0, 10.0, 30.0])
VIEWS = st.sampled_from(["contiguous", "contiguous", "blhd", "sliced", "expanded"])
BLOCK_SIZES = [1, 2, 3, 7, 16, 32, 64, 100, 128, 5000]
# score elements x head dim per case: keeps the float64 oracle (which materialises the
# scores) and six implementations per case within a few hundred milliseconds
BUDGET = 2**21


def _fits(lq: int, lk: int, blocks: tuple[int, int]) -> bool:
    return -(-lq // blocks[0]) * -(-lk // blocks[1]) <= 2**14


@st.composite
def block_specs(draw, lq: int, lk: int, lead: tuple[int, int], depth: int = 0):
    sizes = [(bq, bk) for bq in BLOCK_SIZES for bk in BLOCK_SIZES if _fits(lq, lk, (bq, bk))]
    blocks = draw(st.sampled_from(sizes))
    if depth == 0 and draw(st.integers(0, 3)) == 0:
        left = draw(block_specs(lq, lk, lead, 1))
        right = draw(block_specs(lq, lk, lead, 1))
        right = _with_blocks(right, left)
        return {"combine": draw(st.sampled_from(["|", "&"])), "left": left, "right": right}
    kind = draw(st.sampled_from(["dense", "dense", "causal", "local_window", "global_tokens",
                                 "strided", "modality", "random", "bigbird",
                                 "watts_strogatz"]))
    spec = {"kind": kind, "blocks": blocks, "seed": draw(st.integers(0, 2**31))}
    if kind == "dense":
        spec["lead"] = (draw(st.sampled_from(sorted({1, max(lead[0], 1)}))),
                        draw(st.sampled_from(sorted({1, max(lead[1], 1)}))))
    elif kind == "local_window":
        spec["window"] = draw(st.sampled_from([0, 1, 3, 17, 100]))
    elif kind == "global_tokens":
        spec["num"] = (draw(st.sampled_from([0, 1, 5, 64])), draw(st.sampled_from([0, 1, 5])))
    elif kind == "strided":
        spec["stride"] = draw(st.sampled_from([1, 2, 5, 16, 64]))
        spec["summary"] = draw(st.sampled_from([0, 1, 2, 8]))
        spec["causal"] = draw(st.booleans())
    elif kind == "modality":
        spec["parts"] = draw(st.integers(1, 4))
    elif kind == "random":
        spec["sparsity"] = draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]))
    elif kind == "watts_strogatz":
        spec["k"] = draw(st.sampled_from([0, 1, 2, 4]))
        spec["beta"] = draw(st.sampled_from([0.0, 0.3, 1.0]))
    return spec


def _with_blocks(spec: dict, like: dict) -> dict:
    """``spec`` with the block size of ``like`` (masks combine only at one block size)."""
    blocks = like["blocks"] if "blocks" in like else like["left"]["blocks"]
    if "combine" in spec:
        return {**spec, "left": _with_blocks(spec["left"], like),
                "right": _with_blocks(spec["right"], like)}
    return {**spec, "blocks": blocks}


@st.composite
def attention_cases(draw):
    lq, lk = draw(LENGTHS), draw(LENGTHS)
    cells = max(lq * lk, 1)
    dims = [d for d in HEAD_DIMS if cells * d <= BUDGET] or [1]
    d, dv = draw(st.sampled_from(dims)), draw(st.sampled_from(dims))
    room = max(1, BUDGET // (cells * max(d, dv)))
    hkv = draw(st.sampled_from([h for h in (1, 2, 3) if h <= room] or [1]))
    ratio = draw(st.sampled_from([r for r in (1, 2, 3, 4, 8) if hkv * r <= room] or [1]))
    hq = hkv * ratio
    b = draw(st.sampled_from([x for x in (1, 1, 2, 3, 0) if x * hq <= room] or [1]))
    dtype = draw(DTYPES)
    mask = draw(st.one_of(st.none(), _masks(dtype)))
    block = None
    if draw(st.integers(0, 3)) == 0:
        block = draw(block_specs(lq, lk, (b, hq)))
        if _block_lead(block) not in _leads(b, hq):
            block = None
    return {
        "shape": (b, hq, hkv, lq, lk, d, dv), "dtype": dtype, "amp": draw(AMPLITUDES),
        "views": (draw(VIEWS), draw(VIEWS), draw(VIEWS)), "mask": mask,
        "kpm": draw(st.one_of(st.none(), st.sampled_from([0.0, 0.3, 1.0]))),
        "causal": draw(st.booleans()), "block": block,
        "dropout": draw(st.one_of(st.none(), st.none(), st.tuples(
            st.sampled_from([0.1, 0.5, 1.0]), st.integers(0, 2**63 - 1)))),
        "scale": draw(st.one_of(st.none(), st.none(), st.sampled_from([0.01, 0.5, 2.0]))),
        "weights": draw(st.booleans()), "lse": draw(st.booleans()),
        "grad": draw(st.sampled_from([("q", "k", "v"), ("q", "k", "v"), ("q", "k", "v", "mask"),
                                      (), ("q",), ("k", "v")])),
        "seed": draw(st.integers(0, 2**31)),
    }


def _leads(b: int, hq: int) -> set[tuple[int, int]]:
    return {(x, y) for x in {1, b} for y in {1, hq}}


def _block_lead(spec: dict) -> tuple[int, int]:
    """(Bm, Hm) the spec's mask will have (combinations broadcast)."""
    if "combine" in spec:
        (a, b), (c, d) = _block_lead(spec["left"]), _block_lead(spec["right"])
        if (a != c and 1 not in (a, c)) or (b != d and 1 not in (b, d)):
            return (-1, -1)  # does not broadcast: dropped
        return max(a, c), max(b, d)
    return tuple(spec.get("lead", (1, 1)))


@st.composite
def _masks(draw, dtype: str):
    broadcast = tuple(draw(st.booleans()) for _ in range(4))
    leading = next((i for i, flag in enumerate(broadcast) if not flag), 4)
    ndim = draw(st.integers(max(4 - leading, 0), 4))
    spec = {"broadcast": broadcast, "ndim": ndim, "expanded": draw(st.booleans())}
    if draw(st.booleans()):
        spec.update(kind="bool", density=draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0])))
    else:
        spec.update(kind="float", amp=draw(st.sampled_from([0.5, 3.0, 30.0])),
                    density=draw(st.sampled_from([0.0, 0.0, 0.1, 0.5, 1.0])),
                    dtype=draw(st.sampled_from([dtype, dtype, "float32", "bfloat16"])))
    return spec


@st.composite
def block_mask_cases(draw):
    lq, lk = draw(LENGTHS), draw(LENGTHS)
    lead = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    spec = draw(block_specs(lq, lk, lead))
    if _block_lead(spec) == (-1, -1):
        spec = _with_blocks(draw(block_specs(lq, lk, (1, 1), 1)), spec)
    attention = None
    if lq * lk <= 2**16 and draw(st.integers(0, 2)) > 0:
        attention = {"shape": (draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 4])),
                               draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 8, 33])),
                               draw(st.sampled_from([1, 8, 16]))),
                     "dtype": draw(DTYPES), "amp": draw(AMPLITUDES),
                     "causal": draw(st.booleans())}
    return {"lengths": (lq, lk), "spec": spec, "attention": attention,
            "seed": draw(st.integers(0, 2**31))}


FEATURES = st.sampled_from([1, 2, 3, 7, 8, 17, 31, 64, 97, 128, 1, 3, 17, 64] * 2
                           + [257, 300, 1000, 2048])


@st.composite
def ws_linear_cases(draw):
    out_f, in_f = draw(FEATURES), draw(FEATURES)
    bs = draw(st.sampled_from([1, 1, 1, 2, 3, 4, 8, 16, 32]))
    leads = [lead for lead in [(), (0,), (1,), (5,), (17,), (64,), (2, 3), (257,), (1000,)]
             if math.prod(lead) * out_f * in_f <= BUDGET * 4]
    if draw(st.booleans()):
        layout = {"kind": "mask", "density": draw(st.sampled_from([0.0, 0.05, 0.3, 1.0])),
                  "seed": draw(st.integers(0, 2**31))}
    else:
        layout = {"kind": "ws", "k": draw(st.sampled_from([0, 1, 2, 4, 6])),
                  "beta": draw(st.sampled_from([0.0, 0.3, 1.0])),
                  "seed": draw(st.integers(0, 2**31))}
    return {"out": out_f, "in": in_f, "bs": bs, "layout": layout,
            "lead": draw(st.sampled_from(leads or [(1,)])),
            "view": draw(st.sampled_from(["contiguous", "contiguous", "transposed", "sliced",
                                          "expanded"])),
            "dtype": draw(DTYPES), "amp": draw(AMPLITUDES), "bias": draw(st.booleans()),
            "grad": draw(st.sampled_from([("x", "values", "bias"), ("x", "values", "bias"),
                                          ("x",), ("values",), ()])),
            "seed": draw(st.integers(0, 2**31))}


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    path = os.environ.get("MMATTN_FUZZ_REPORT")
    if path:
        harness.write_report(path)


@fuzz_settings()
@given(case=attention_cases())
def test_cross_attention_against_float64_oracle(case):
    harness.check_attention(case)


@fuzz_settings()
@given(case=block_mask_cases())
def test_block_mask_against_its_rule_and_the_oracle(case):
    harness.check_block_mask(case)


@fuzz_settings()
@given(case=ws_linear_cases())
def test_ws_linear_against_float64_oracle(case):
    harness.check_ws_linear(case)


def test_every_backend_module_is_a_fuzz_variant():
    """A backend added to mmattn.backends is fuzzed without a change to the harness."""
    names = {v.backend for v in harness.variants()}
    assert names == set(harness.backends.NAMES)


# Cases the fuzzer found, kept as fixed regressions (every variant that supports them).
REGRESSIONS = [
    # peaked row (P 1 - 4e-6, second key at 4e-6, logits near 90): float32 sums of
    # exp(s - lse) dP in the CPU backward's stats pass gave dq 5x the reference's error
    ("attention", {"shape": (1, 6, 2, 7, 7, 2, 2), "dtype": "float32", "amp": 30.0,
                   "views": ("contiguous", "blhd", "contiguous"), "mask": None, "kpm": None,
                   "causal": False, "block": None, "dropout": None, "scale": None,
                   "weights": False, "lse": False, "grad": ("q", "k", "v"), "seed": 72}),
    # the same in the Triton stats pass (head dim 1, causal, bigbird blocks): dk 2.5x
    ("block_mask", {"lengths": (31, 31),
                    "spec": {"kind": "bigbird", "blocks": (5000, 64), "seed": 72810},
                    "attention": {"shape": (2, 1, 1, 1, 8), "dtype": "float32", "amp": 10.0,
                                  "causal": True}, "seed": 4126}),
    # two keys, logits near 900: the float32 references' own errors span 10x by
    # summation order (the rule takes the largest of several orders)
    ("block_mask", {"lengths": (63, 2),
                    "spec": {"kind": "dense", "blocks": (16, 16), "seed": 1, "lead": (3, 3)},
                    "attention": {"shape": (1, 2, 2, 33, 16), "dtype": "float32",
                                  "amp": 30.0, "causal": True}, "seed": 30276}),
]


@pytest.mark.parametrize(("op", "case"), REGRESSIONS)
def test_fuzz_regressions(op, case):
    harness.run(op, case)


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="known: the portable (no AVX2) CPU build's dq is 2.7x the worst "
                          "float32 reference on this near-tie case at logits near 900 "
                          "(AVX2/AVX-512 builds: 1.0x); found by MMATTN_FUZZ_SEED=7")
def test_fuzz_known_failure_generic_cpu_build():
    harness.run("block_mask", {
        "lengths": (65, 65),
        "spec": {"combine": "&",
                 "left": {"kind": "dense", "blocks": (16, 100), "seed": 23357981,
                          "lead": (3, 1)},
                 "right": {"kind": "random", "blocks": (16, 100), "seed": 2901,
                           "sparsity": 0.0}},
        "attention": {"shape": (1, 4, 1, 8, 8), "dtype": "float32", "amp": 30.0,
                      "causal": True},
        "seed": 131915}, "cpu/generic")
