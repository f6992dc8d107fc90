"""`mmexport lint DIR`: a static TensorRT-risk check of every exported graph, without TensorRT.

What it looks at, per component:
  - the default-domain opset against the range TensorRT's ONNX parser documents (9..24 for TensorRT 10.15);
  - operators TensorRT's ONNX parser lists as unsupported (onnx-tensorrt docs/operators.md, embedded below),
    operators it does not list at all, and operators from other domains (custom ops need a plugin);
  - DOUBLE tensors (cast down to FLOAT with clamping), INT64 graph I/O (native in TensorRT 10; TensorRT 8
    casts to INT32), types TensorRT has no equivalent for (string, complex, 16-bit and unsigned wide ints);
  - data-dependent shapes: NonZero / Unique / Compress / NonMaxSuppression always, and shape-giving inputs
    (Reshape's shape, Expand's shape, Range's bounds, Slice's starts/ends, Tile's repeats, ...) computed
    from input *values* rather than from shapes and constants; Loop / If / Scan control flow;
  - inputs the parser wants as build-time constants (Squeeze/Unsqueeze axes, Reduce* axes, CumSum axis,
    OneHot depth, TopK K) when they are not;
  - external data: the files and their size, and the .onnx protobuf's 2 GiB limit;
  - the spec's optimization profiles: a derived dim (total_len = past_len + seq_len) whose max is not the
    sum of its parts' max makes TensorRT's kMAX shapes inconsistent (TensorRT warns at build time).

Severity: 'error' = the TensorRT parser will reject the graph; 'warning' = likely trouble (a failed
build, a slow or wrong engine); 'info' = worth knowing. Nodes inside If/Loop/Scan bodies and model-local
functions are checked too.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from .errors import UserError

# ---------------------------------------------------------------------------------------------------
# Data: onnx-tensorrt docs/operators.md ("TensorRT 10.15 supports operators in the inclusive range of
# opset 9 to opset 24"), the operator support matrix. Every operator marked N there is rejected by the
# TensorRT-RTX 1.7 parser too (checked by tests/test_lint_doctor.py).
# ---------------------------------------------------------------------------------------------------
TRT_DOC_VERSION = "10.15"
TRT_OPSET_MIN, TRT_OPSET_MAX = 9, 24

TRT_SUPPORTED_OPS = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
    BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
    CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike
    Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
    Greater GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish
    Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
    LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
    MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
    ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike
    Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd
    ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RMSNormalization RNN RoiAlign
    RotaryEmbedding Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid
    Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh
    TensorScatter ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
    """.split()
)

TRT_UNSUPPORTED_OPS = frozenset(
    """
    AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im CenterCropPad Compress
    ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder MatMulInteger MaxRoiPool
    MaxUnpool MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement
    OptionalHasElement QLinearConv QLinearMatMul RegexFullMatch SequenceAt SequenceConstruct SequenceEmpty
    SequenceErase SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence
    StringConcat StringNormalizer StringSplit TfIdfVectorizer Unique
    """.split()
)

# Restrictions from the same table worth repeating when the operator appears.
TRT_OP_NOTES = {
    "Attention": "Q, K, V and attn_mask must be 4D; past/present KV inputs and outputs are unsupported",
    "LayerNormalization": "only the first output Y is supported",
    "Resize": "modes nearest/linear only, no antialiasing",
    "TopK": "`sorted` must be 1 and K below 3840",
    "ScatterND": "only reduction='none'",
    "Loop": "scan outputs cannot have a dynamic length; carried shapes must not change across iterations",
    "If": "both branches' outputs must have the same rank",
}

# Operators whose output shape depends on the input values.
DATA_DEPENDENT_OPS = {
    "NonZero": "TensorRT-RTX 1.7's parser rejects it (it needs a plugin)",
    "Unique": "",
    "Compress": "",
    "NonMaxSuppression": "",
}

# op -> input indices that give an output *shape* (value-dependent when computed from input values).
SHAPE_INPUTS = {
    "Reshape": (1,),
    "Expand": (1,),
    "ConstantOfShape": (0,),
    "Tile": (1,),
    "Range": (0, 1, 2),
    "Slice": (1, 2, 3, 4),
    "Pad": (1, 3),
    "Resize": (2, 3),
    "Upsample": (1,),
    "Split": (1,),
}

# op -> input indices that TensorRT's parser wants resolvable to build-time constants.
CONST_INPUTS = {
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "CumSum": (1,),
    "OneHot": (1,),
    "TopK": (1,),
    **{op: (1,) for op in (
        "ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum "
        "ReduceSumSquare"
    ).split()},
}

CONTROL_FLOW_OPS = ("Loop", "If", "Scan")

# TensorProto.DataType numbers -> names; the ones TensorRT has no type for.
_DTYPE_NAMES = {
    1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 8: "string",
    9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 14: "complex64", 15: "complex128",
    16: "bfloat16", 17: "float8e4m3fn", 18: "float8e4m3fnuz", 19: "float8e5m2", 20: "float8e5m2fnuz",
    21: "uint4", 22: "int4", 23: "float4e2m1",
}
_UNSUPPORTED_DTYPES = {4, 5, 8, 12, 13, 14, 15}
INT64, DOUBLE = 7, 11

PROTOBUF_LIMIT = 2 << 30  # 2 GiB: protobuf cannot parse a larger .onnx file (weights must be external)

SEVERITIES = ("error", "warning", "info")
_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class Finding:
    component: str
    severity: str  # 'error' | 'warning' | 'info'
    code: str  # unsupported-op, custom-op, unknown-op, opset, dtype-double, dtype-int64, dtype-unsupported,
    # data-dependent-shape, non-constant-input, control-flow, op-restriction, external-data,
    # protobuf-limit, missing-external-data, profile-inconsistent
    message: str
    node: str = ""
    op: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------
# Graph walk
# ---------------------------------------------------------------------------------------------------


class _Linter:
    def __init__(self, component: str, onnx_mod: Any, model: Any):
        self.component = component
        self.onnx = onnx_mod
        self.model = model
        self.findings: list[Finding] = []
        self.functions = {(f.domain, f.name): f for f in model.functions}
        self._seen_once: set[tuple[str, str]] = set()

    def add(self, severity: str, code: str, message: str, node: str = "", op: str = "") -> None:
        self.findings.append(Finding(self.component, severity, code, message, node, op))

    def once(self, key: tuple[str, str]) -> bool:
        if key in self._seen_once:
            return False
        self._seen_once.add(key)
        return True

    # -- dtypes ---------------------------------------------------------------------------------------
    def dtypes(self, graph: Any, top: bool) -> None:
        def elem(vi: Any) -> int:
            return vi.type.tensor_type.elem_type if vi.type.HasField("tensor_type") else 0

        io = [(vi.name, elem(vi), "input") for vi in graph.input] + [(vi.name, elem(vi), "output") for vi in graph.output]
        inner = [(vi.name, elem(vi), "tensor") for vi in graph.value_info]
        inner += [(t.name, t.data_type, "initializer") for t in graph.initializer]
        for name, dt, kind in io + inner:
            if dt in _UNSUPPORTED_DTYPES:
                sev = "error" if kind in ("input", "output", "initializer") else "warning"
                self.add(sev, "dtype-unsupported", f"{kind} {name} is {_DTYPE_NAMES[dt]}, which TensorRT has no type for", name)
            elif dt == DOUBLE:
                self.add(
                    "warning",
                    "dtype-double",
                    f"{kind} {name} is float64: TensorRT casts DOUBLE down to FLOAT, clamping to +-FLT_MAX",
                    name,
                )
            elif dt == INT64 and top and kind in ("input", "output"):
                self.add(
                    "info",
                    "dtype-int64",
                    f"graph {kind} {name} is int64: bound as INT64 by TensorRT 10 (feed int64); "
                    "TensorRT 8.x casts INT64 to INT32, clamping values beyond +-2^31",
                    name,
                )

    # -- nodes ----------------------------------------------------------------------------------------
    def graph(self, graph: Any, outer_static: dict[str, str], top: bool = False) -> None:
        """Walk `graph`; `outer_static` maps visible tensor names to 'const' | 'shape' | 'data'."""
        kinds = dict(outer_static)
        for t in graph.initializer:
            kinds[t.name] = "const"
        for vi in graph.input:
            if vi.name not in kinds or top:
                kinds[vi.name] = "data" if vi.name not in {t.name for t in graph.initializer} else "const"
        self.dtypes(graph, top)
        for n in graph.node:
            self.node(n, kinds)

    def _input_kind(self, kinds: dict[str, str], name: str) -> str:
        if not name:
            return "const"  # omitted optional input
        return kinds.get(name, "data")

    def node(self, n: Any, kinds: dict[str, str]) -> None:
        op, dom = n.op_type, n.domain
        label = n.name or (n.output[0] if n.output else "")
        in_kinds = [self._input_kind(kinds, i) for i in n.input]

        # Operators
        if (dom, op) in self.functions:
            f = self.functions[(dom, op)]
            if self.once((dom, op)):
                sub = {name: "data" for name in f.input}
                for fn in f.node:
                    self.node(fn, sub)
        elif dom in _DEFAULT_DOMAINS:
            if op in TRT_UNSUPPORTED_OPS:
                self.add("error", "unsupported-op", f"{op} is not supported by TensorRT's ONNX parser", label, op)
            elif op not in TRT_SUPPORTED_OPS:
                self.add(
                    "warning",
                    "unknown-op",
                    f"{op} is not in TensorRT {TRT_DOC_VERSION}'s ONNX operator table; the parser may reject it",
                    label,
                    op,
                )
            elif op in TRT_OP_NOTES and self.once(("note", op)):
                self.add("info", "op-restriction", f"{op}: {TRT_OP_NOTES[op]}", label, op)
        else:
            self.add(
                "error",
                "custom-op",
                f"{dom}::{op} is outside the ONNX standard domain: TensorRT needs a plugin for it",
                label,
                op,
            )

        # Data-dependent shapes
        if dom in _DEFAULT_DOMAINS and op in DATA_DEPENDENT_OPS:
            extra = DATA_DEPENDENT_OPS[op]
            self.add(
                "warning",
                "data-dependent-shape",
                f"{op}'s output shape depends on input values (TensorRT needs an output allocator)"
                + (f"; {extra}" if extra else ""),
                label,
                op,
            )
        if dom in _DEFAULT_DOMAINS and op in SHAPE_INPUTS:
            bad = [n.input[i] for i in SHAPE_INPUTS[op] if i < len(n.input) and in_kinds[i] == "data"]
            if bad:
                self.add(
                    "warning",
                    "data-dependent-shape",
                    f"{op}'s output shape comes from input values ({', '.join(bad)}), not from shapes or "
                    "constants: a data-dependent shape TensorRT cannot plan for",
                    label,
                    op,
                )
        if dom in _DEFAULT_DOMAINS and op in CONST_INPUTS:
            bad = [n.input[i] for i in CONST_INPUTS[op] if i < len(n.input) and n.input[i] and in_kinds[i] != "const"]
            if bad:
                self.add(
                    "warning",
                    "non-constant-input",
                    f"{op} input {', '.join(bad)} is not a build-time constant; TensorRT's parser needs it constant",
                    label,
                    op,
                )
        if dom in _DEFAULT_DOMAINS and op in CONTROL_FLOW_OPS:
            self.add(
                "warning",
                "control-flow",
                f"{op}: control flow in the graph; TensorRT builds it with restrictions and it is often slow",
                label,
                op,
            )

        # Subgraphs (If/Loop/Scan bodies) see the outer names.
        for a in n.attribute:
            subs = ([a.g] if a.HasField("g") else []) + list(a.graphs)
            for g in subs:
                self.graph(g, kinds)

        # What this node's outputs are: constants stay constants, Shape/Size make shape values.
        if op in ("Constant",) and dom in _DEFAULT_DOMAINS:
            out_kind = "const"
        elif op in ("Shape", "Size") and dom in _DEFAULT_DOMAINS:
            out_kind = "shape"
        elif op in DATA_DEPENDENT_OPS or op in CONTROL_FLOW_OPS or dom not in _DEFAULT_DOMAINS:
            out_kind = "data"
        elif all(k == "const" for k in in_kinds):
            out_kind = "const"
        elif all(k in ("const", "shape") for k in in_kinds):
            out_kind = "shape"
        else:
            out_kind = "data"
        for o in n.output:
            if o:
                kinds[o] = out_kind


def _load_onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise UserError("`mmexport lint` needs the onnx package: pip install onnx (or 'mmexport[export]')") from None
    return onnx


def lint_onnx(path: "str | Path", component: str | None = None) -> list[Finding]:
    """Findings for one ONNX file (its external data is not loaded)."""
    onnx = _load_onnx()
    path = Path(path)
    component = component or path.stem
    findings: list[Finding] = []
    size = path.stat().st_size
    if size >= PROTOBUF_LIMIT:
        findings.append(Finding(component, "error", "protobuf-limit",
                                f"{path.name} is {size / 2**30:.2f} GiB: protobuf cannot parse a .onnx file of 2 GiB "
                                "or more; save the weights as external data"))
        return findings
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise UserError(f"{path}: not a readable ONNX file ({type(e).__name__}: {e})") from None
    lt = _Linter(component, onnx, model)

    # Opset
    opset = next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), None)
    if opset is None:
        lt.add("warning", "opset", "the model declares no default-domain opset")
    elif opset < TRT_OPSET_MIN or opset > TRT_OPSET_MAX:
        lt.add(
            "warning",
            "opset",
            f"opset {opset} is outside the range TensorRT {TRT_DOC_VERSION}'s ONNX parser documents "
            f"({TRT_OPSET_MIN}..{TRT_OPSET_MAX})",
        )
    else:
        lt.add(
            "info",
            "opset",
            f"opset {opset} (TensorRT {TRT_DOC_VERSION} documents {TRT_OPSET_MIN}..{TRT_OPSET_MAX}; "
            "older TensorRT releases document narrower ranges)",
        )

    lt.graph(model.graph, {}, top=True)

    # External data
    from .artifact.engines import external_data_files

    locations = external_data_files(path)
    total = 0
    for loc in locations:
        p = path.parent / loc
        if not p.is_file():
            lt.add("error", "missing-external-data", f"external data file {loc} is missing next to {path.name}")
        else:
            total += p.stat().st_size
    if locations:
        lt.add(
            "info",
            "external-data",
            f"weights in {len(locations)} external data file(s) ({', '.join(locations)}), {total / 2**20:.1f} MiB; "
            "keep them next to the .onnx file (the parser resolves them relative to it)",
        )
    return lt.findings


def lint_profiles(spec: Any) -> list[Finding]:
    """Spec-level checks of the optimization profiles (see the module doc)."""
    findings: list[Finding] = []
    for prof, dims in spec.profile_dims().items():
        for d in dims.values():
            if not d.derived:
                continue
            parts_max = sum(dims[n].max for n in d.derived)
            if d.max != parts_max:
                findings.append(
                    Finding(
                        spec.name,
                        "warning",
                        "profile-inconsistent",
                        f"profile {prof!r}: {d.name} = {' + '.join(d.derived)} but its max is {d.max} while the "
                        f"parts' maxima add up to {parts_max}: TensorRT's kMAX shapes are not self-consistent "
                        "(it warns at build time); lower the parts' max or raise the derived max",
                    )
                )
    return findings


def lint_artifacts(artifact_dir: "str | Path") -> list[Finding]:
    """Findings for every component of an artifact directory, errors first within each component."""
    from .runtime.manifest import load_manifest

    m = load_manifest(Path(artifact_dir), check_files=False)
    findings: list[Finding] = []
    for name, spec in m.components.items():
        path = m.component_file(name)
        if not path.is_file():
            findings.append(Finding(name, "error", "missing-file", f"{path} is missing"))
            continue
        comp = lint_onnx(path, name) + lint_profiles(spec)
        comp.sort(key=lambda f: SEVERITIES.index(f.severity))
        findings += comp
    return findings


def has_errors(findings: Iterable[Finding]) -> bool:
    return any(f.severity == "error" for f in findings)


def lint_report_json(artifact_dir: "str | Path", findings: list[Finding] | None = None) -> dict[str, Any]:
    """A JSON-serialisable report: {artifact_dir, ok, counts, tensorrt_reference, findings: [...]}."""
    if findings is None:
        findings = lint_artifacts(artifact_dir)
    counts = {s: sum(f.severity == s for f in findings) for s in SEVERITIES}
    return {
        "artifact_dir": str(artifact_dir),
        "ok": counts["error"] == 0,
        "counts": counts,
        "tensorrt_reference": f"onnx-tensorrt operators.md for TensorRT {TRT_DOC_VERSION} (opset {TRT_OPSET_MIN}..{TRT_OPSET_MAX})",
        "findings": [f.to_dict() for f in findings],
    }


def render_lint(findings: list[Finding], console: Any, artifact_dir: "str | Path | None" = None) -> None:
    """A Rich table of the findings, then one summary line."""
    from rich.table import Table

    style = {"error": "red", "warning": "yellow", "info": "dim"}
    t = Table("component", "severity", "code", "node / op", "message", title=f"lint {artifact_dir}" if artifact_dir else None)
    for f in findings:
        where = " / ".join(x for x in (f.node, f.op) if x)
        t.add_row(f.component, f"[{style[f.severity]}]{f.severity}[/]", f.code, where, f.message)
    console.print(t)
    counts = {s: sum(f.severity == s for f in findings) for s in SEVERITIES}
    console.print(f"{counts['error']} error(s), {counts['warning']} warning(s), {counts['info']} info", highlight=False)
