"""The bench report for people: a Rich table and a PNG plot."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .results import STAGES, BenchReport, Stats


def _fmt_ms(s: Stats) -> str:
    return f"{s.median:,.1f}" + (f" [dim]({s.min:,.1f}-{s.max:,.1f})[/dim]" if len(s.samples) > 1 else "")


def render_bench(report: BenchReport, console) -> None:
    from rich.table import Table

    o, e = report.ours, report.eager
    r = report.ratios or {}
    title = (f"bench {report.artifacts} ({report.precision}{', ' + report.quantization if report.quantization else ''}, {report.backend}): {report.image}, "
             f"{o.prompt_tokens} prompt tokens, {report.new_tokens} new tokens, median of {report.repeat}")
    cols = ["stage", f"{o.name} ms"] + ([f"{e.name} ms", "ours / eager"] if e else [])
    t = Table(*cols, title=title)
    for k in STAGES:
        if k not in o.timings_ms:
            continue
        row = [k, _fmt_ms(o.timings_ms[k])]
        if e:
            row += [_fmt_ms(e.timings_ms[k]) if k in e.timings_ms else "-", f"{r[k + '_ratio']:.2f}x" if k + "_ratio" in r else "-"]
        t.add_row(*row, style="bold" if k == "ttft" else None)
    row = ["decode tok/s", _fmt_ms(o.tokens_per_s)]
    if e:
        row += [_fmt_ms(e.tokens_per_s), f"{r['decode_speedup']:.2f}x speed-up" if "decode_speedup" in r else "-"]
    t.add_row(*row, style="bold")
    row = ["tokens generated", str(o.tokens_generated)] + ([str(e.tokens_generated), ""] if e else [])
    t.add_row(*row)
    row = ["load s", f"{o.load_s:.2f}"] + ([f"{e.load_s:.2f}", ""] if e else [])
    t.add_row(*row)
    console.print(t)
    if o.calls:
        console.print("component calls per request: " + ", ".join(f"{k} {v}" for k, v in o.calls.items()), highlight=False)

    mt = Table("memory (MB)", o.name, *([e.name] if e else []))
    for label, f in (("before load", "baseline_mb"), ("after load", "loaded_mb"), ("peak (timed runs)", "peak_mb"), ("peak - before load", "peak_delta_mb")):
        mt.add_row(label, f"{getattr(o.memory, f):,.0f}", *([f"{getattr(e.memory, f):,.0f}"] if e else []))
    console.print(mt)
    if report.limits is not None:
        render_limits(report.limits, console)
    if e:
        a = report.agreement or {}
        console.print(f"greedy tokens: first token {'agrees' if a.get('first_token') else 'DIFFERS'}, "
                      f"{a.get('common_prefix', 0)}/{report.new_tokens} identical prefix, {a.get('fraction', 0):.0%} agree", highlight=False)
        if report.reference and not report.reference.get("same_as_build"):
            console.print("[yellow]warning: the eager checkpoint is not the one this build was exported from[/yellow]")
    mi = report.machine
    console.print(f"[dim]{mi.get('cpu')} x{mi.get('cpu_count')}, {mi.get('platform')}, onnxruntime {mi.get('onnxruntime')}"
                  + (f", torch {mi.get('torch')} ({mi.get('torch_threads')} threads)" if "torch" in mi else "")
                  + f"; memory: {o.memory.method}[/dim]", highlight=False)


def require_matplotlib() -> None:
    """Raise UserError unless matplotlib can be imported (the CLI calls this before a long bench)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("--plot needs matplotlib (pip install matplotlib)") from None


def plot_bench(report: BenchReport, path: Path | str) -> Path:
    """A PNG: TTFT split (stacked), decode tokens/s and peak memory, ours vs eager."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path = Path(path)
    sides = [report.ours] + ([report.eager] if report.eager else [])
    names = [s.name for s in sides]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), gridspec_kw={"width_ratios": [2.2, 1, 1]})
    ax = axes[0]
    left = [0.0] * len(sides)
    colors = {"preprocess": "#9e9e9e", "vision": "#1f77b4", "projector": "#17becf", "cross_kv": "#9467bd", "prefill": "#ff7f0e"}
    for k, c in colors.items():
        if not any(k in s.timings_ms for s in sides):
            continue
        vals = [s.timings_ms[k].median if k in s.timings_ms else 0.0 for s in sides]
        ax.barh(names, vals, left=left, color=c, label=k)
        left = [a + b for a, b in zip(left, vals)]
    for i, s in enumerate(sides):
        ax.text(left[i], i, f" {s.timings_ms['ttft'].median:,.0f} ms", va="center")
    ax.set_xlabel("time to first token (ms, median)")
    ax.set_xlim(0, max(left) * 1.25 if max(left) > 0 else 1)
    ax.invert_yaxis()
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=4, fontsize=8, frameon=False)
    labels = [n.split(" (")[0] for n in names]
    _bar_panel(axes[1], labels, [s.tokens_per_s.median for s in sides], "decode tokens/s (median)", "{:.1f}")
    _bar_panel(axes[2], labels, [s.memory.peak_delta_mb for s in sides], "peak RSS over baseline (MB)", "{:,.0f}")
    mi = report.machine
    fig.suptitle(f"{report.recipe or report.artifacts} ({report.precision}, {report.backend}): {report.ours.prompt_tokens} prompt tokens, "
                 f"{report.new_tokens} new tokens; {mi.get('cpu_count')} CPUs, onnxruntime {mi.get('onnxruntime')}"
                 + (f", torch {mi['torch']}" if "torch" in mi else ""), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path



def _bar_panel(ax, labels: list[str], vals: list[float], ylabel: str, fmt: str) -> None:
    """One bar per side (ours green, eager red), each labelled with its value."""
    ax.bar(range(len(vals)), vals, color=["#2ca02c", "#d62728"][: len(vals)])
    ax.set_xticks(range(len(vals)), labels, fontsize=8)
    ax.set_ylabel(ylabel)
    for i, v in enumerate(vals):
        ax.text(i, v, fmt.format(v), ha="center", va="bottom")
    ax.set_ylim(0, max(vals) * 1.15 if max(vals) > 0 else 1)


def render_limits(lim, console) -> None:
    """The run against this machine's measured limits: decode against read bandwidth, prefill and vision
    against the GEMM peak of each one's weight format."""
    from rich.table import Table

    pct = lim.percent
    b = lim.decode_bytes
    t = Table("stage", "achieved", "this machine's limit", "% of limit",
              title=f"against this machine's limits ({lim.threads} thread(s), measured after each timed run)")

    def p(v):
        return f"{v:.0f} %" if v is not None else "-"

    def spread(samples, digits=1):
        return f"; median of {len(samples)}, {min(samples):.{digits}f}-{max(samples):.{digits}f}" if len(samples) > 1 else ""

    t.add_row("decode", f"{lim.decode_gbps:.1f} GB/s ({b['total'] / 1e6:,.0f} MB per token: weights {b['weights'] / 1e6:,.0f}, "
              f"KV cache {b['kv_cache'] / 1e6:,.1f}, embedding row {b['embedding_row'] / 1e3:.1f} KB)",
              f"{lim.read_gbps:.1f} GB/s read (same working set{spread(lim.read_gbps_samples)})", p(pct["decode"]))
    peak = (f"{lim.gemm_peak_gflops:.0f} GFLOP/s ({lim.gemm_kind}{spread(lim.gemm_peak_samples.get(lim.gemm_kind, []), 0)})"
            if lim.gemm_peak_gflops else "- (needs onnx)")
    if lim.prefill_gflops is not None:
        t.add_row("prefill", f"{lim.prefill_gflops:.0f} GFLOP/s ({lim.prefill_flops / 1e9:,.1f} GFLOP of weight MatMuls)", peak, p(pct["prefill"]))
    if lim.vision_gflops is not None:
        vpeak = (f"{lim.vision_gemm_peak_gflops:.0f} GFLOP/s ({lim.vision_gemm_kind}{spread(lim.gemm_peak_samples.get(lim.vision_gemm_kind, []), 0)})"
                 if lim.vision_gemm_peak_gflops else "- (needs onnx)")
        t.add_row("vision", f"{lim.vision_gflops:.0f} GFLOP/s ({lim.vision_flops / 1e9:,.1f} GFLOP of weight MatMuls)", vpeak, p(pct["vision"]))
    console.print(t)


def render_builds(reports: list[BenchReport], console) -> None:
    """Builds compared on one request (`bench_builds`): a row per build, then each build's limits."""
    from rich.table import Table

    first = reports[0]
    title = (f"{len(reports)} builds, timed runs interleaved: {first.image}, {first.ours.prompt_tokens} prompt tokens, "
             f"{first.new_tokens} new tokens, median of {first.repeat}")
    t = Table("build", "weights", "TTFT ms", "vision ms", "prefill ms", "decode tok/s", "vs 1", "% of read bw",
              "peak MB", "tokens as 1", title=title)
    base = first.ours.tokens_per_s.median
    for i, r in enumerate(reports):
        o = r.ours
        tm = o.timings_ms
        same = sum(1 for a, b in zip(o.token_ids, first.ours.token_ids) if a == b)
        pct = r.limits.percent.get("decode") if r.limits is not None else None
        t.add_row(f"{i + 1}: {r.artifacts}", r.precision + (f" + {r.quantization}" if r.quantization else ""), _fmt_ms(tm["ttft"]),
                  _fmt_ms(tm["vision"]) if "vision" in tm else "-", _fmt_ms(tm["prefill"]) if "prefill" in tm else "-",
                  _fmt_ms(o.tokens_per_s), f"{o.tokens_per_s.median / base:.2f}x" if base > 0 else "-",
                  f"{pct:.0f} %" if pct is not None else "-", f"{o.memory.peak_delta_mb:,.0f}",
                  f"{same}/{len(first.ours.token_ids)}")
    console.print(t)
    console.print("[dim]vs 1: decode speed against build 1's; % of read bw: decode against the read bandwidth sampled beside "
                  "this build's own runs; peak MB: the largest RSS rise over before its load; tokens as 1: greedy tokens "
                  "equal to build 1's, position by position[/dim]", highlight=False)
    for i, r in enumerate(reports):
        if r.limits is not None:
            console.print(f"build {i + 1}: {r.artifacts}", highlight=False)
            render_limits(r.limits, console)
    mi = first.machine
    console.print(f"[dim]{mi.get('cpu')} x{mi.get('cpu_count')}, {mi.get('platform')}, onnxruntime {mi.get('onnxruntime')}; "
                  f"memory: {first.ours.memory.method}[/dim]", highlight=False)
