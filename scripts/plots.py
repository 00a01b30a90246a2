#!/usr/bin/env python3
"""The pictures of BENCHMARKS.md, from the benchmark's own output (`record --json` of real
processes started together on a barrier), drawn as SVG with no dependency:

- docs/contention-cdf.svg: the lock-wait distribution of the contention workload (N processes
  x K writes holding H ms), as a CDF on a log time axis: this crate with its fair queue, this
  crate with the queue off (SQLite's busy handler and the retry policy), and plain Diesel
  (failed writes are not waits: the legend counts them);
- docs/throughput.svg: writes per second against the number of writer processes, each
  process writing TOTAL / n short transactions, with the queue and without.

Build first: cargo build --release. usage: scripts/plots.py [N K H TOTAL] (default 32 20 10 16000)"""
import json, math, os, subprocess, sys, tempfile, time

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
binary = os.path.join(root, "target", "release", "sqlite-persistence")
n, k, h, total = (int(a) for a in (sys.argv[1:5] if len(sys.argv) >= 5 else (32, 20, 10, 16000)))
out_dir = os.path.join(root, "docs")
os.makedirs(out_dir, exist_ok=True)


def run(processes, writes, hold, extra):
    """Starts the processes on a fresh file, releases them together; returns (waits in ms of
    the acknowledged writes, failed processes, writes per second)."""
    d = tempfile.mkdtemp()
    db, barrier = os.path.join(d, "p.db"), os.path.join(d, "go")
    cmd = [binary, "record", "--db", db, "--barrier", barrier, "--artifact", "a", "--count",
           str(writes), "--hold-ms", str(hold), "--json"] + extra
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
             for _ in range(processes)]
    t0 = time.time()
    while sum(1 for f in os.listdir(d) if ".ready-" in f) < processes:
        if time.time() - t0 > 120:
            sys.exit("children not ready")
        time.sleep(0.005)
    start = time.time()
    open(barrier, "w").close()
    waits, failed = [], 0
    for p in procs:
        out, _ = p.communicate(timeout=600)
        waits += [json.loads(line)["wait_us"] / 1000 for line in out.decode().splitlines()]
        failed += p.returncode != 0
    return waits, failed, len(waits) / (time.time() - start)


def svg(path, width, height, body):
    with open(path, "w") as f:
        f.write(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
                f'font-family="sans-serif" font-size="12">\n'
                f'<rect width="{width}" height="{height}" fill="white"/>\n{body}</svg>\n')


COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]
W, H, L, R, T, B = 720, 470, 70, 20, 100, 55  # size and margins; the legend above the plot


def frame(title, xlabel, ylabel, xticks, yticks, x, y):
    s = f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>\n'
    s += f'<rect x="{L}" y="{T}" width="{W - L - R}" height="{H - T - B}" fill="none" stroke="#444"/>\n'
    for value, label in xticks:
        px = x(value)
        s += f'<line x1="{px}" y1="{T}" x2="{px}" y2="{H - B}" stroke="#ddd"/>\n'
        s += f'<text x="{px}" y="{H - B + 16}" text-anchor="middle">{label}</text>\n'
    for value, label in yticks:
        py = y(value)
        s += f'<line x1="{L}" y1="{py}" x2="{W - R}" y2="{py}" stroke="#ddd"/>\n'
        s += f'<text x="{L - 6}" y="{py + 4}" text-anchor="end">{label}</text>\n'
    s += f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">{xlabel}</text>\n'
    s += (f'<text x="16" y="{(T + H - B) / 2}" text-anchor="middle" '
          f'transform="rotate(-90 16 {(T + H - B) / 2})">{ylabel}</text>\n')
    return s


def legend(entries, left=L + 12, top=48):
    s = ""
    for i, (label, color) in enumerate(entries):
        yy = top + 18 * i
        s += f'<rect x="{left - 4}" y="{yy - 13}" width="330" height="18" fill="white" opacity="0.85"/>\n'
        s += f'<line x1="{left}" y1="{yy - 4}" x2="{left + 24}" y2="{yy - 4}" stroke="{color}" stroke-width="2.5"/>\n'
        s += f'<text x="{left + 30}" y="{yy}">{label}</text>\n'
    return s


def cdf_plot(series):
    lo, hi = 0.1, max(max(w) for _, w, _ in series if w) * 1.5
    x = lambda ms: L + (math.log10(max(ms, lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * (W - L - R)
    y = lambda frac: H - B - frac * (H - T - B)
    decades = [10 ** e for e in range(-1, int(math.log10(hi)) + 1)]
    xticks = [(v, f"{v:g}" if v > lo else f"&#8804; {v:g}") for v in decades]
    yticks = [(f, f"{int(f * 100)} %") for f in (0, 0.25, 0.5, 0.75, 1)]
    body = frame(f"Lock waits: {n} processes x {k} writes holding {h} ms (fair wait {n * h} ms)",
                 "wait for the write lock, ms (log)", "writes that waited at most that long",
                 xticks, yticks, x, y)
    entries = []
    for i, (label, waits, failed) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        waits = sorted(waits)
        points = [f"{x(w):.1f},{y((j + 1) / len(waits)):.1f}" for j, w in enumerate(waits)]
        body += f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{" ".join(points)}"/>\n'
        entries.append((f"{label}: {len(waits)} writes, {failed} of {n} processes failed", color))
    body += f'<line x1="{x(n * h)}" y1="{T}" x2="{x(n * h)}" y2="{H - B}" stroke="#888" stroke-dasharray="4 3"/>\n'
    body += f'<text x="{x(n * h) - 4}" y="{H - B - 8}" text-anchor="end" fill="#666">fair wait</text>\n'
    body += legend(entries)
    svg(os.path.join(out_dir, "contention-cdf.svg"), W, H, body)


def throughput_plot(counts, series):
    top = max(max(r) for _, r in series) * 1.15
    x = lambda c: L + (math.log2(c) / math.log2(max(counts))) * (W - L - R)
    y = lambda r: H - B - r / top * (H - T - B)
    step = 10 ** int(math.log10(top)) / 2
    yticks = [(v * step, f"{v * step:,.0f}") for v in range(int(top / step) + 1)]
    body = frame(f"Throughput: {total} short writes shared by n processes", "writer processes (log2)",
                 "writes per second", [(c, str(c)) for c in counts], yticks, x, y)
    entries = []
    for i, (label, rates) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        points = [f"{x(c):.1f},{y(r):.1f}" for c, r in zip(counts, rates)]
        body += f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{" ".join(points)}"/>\n'
        for c, r in zip(counts, rates):
            body += f'<circle cx="{x(c):.1f}" cy="{y(r):.1f}" r="3" fill="{color}"/>\n'
        entries.append((label, color))
    body += legend(entries)
    svg(os.path.join(out_dir, "throughput.svg"), W, H, body)


modes = [("fair queue", []), ("queue off", ["--no-fair-queue"]), ("plain Diesel", ["--plain"])]
series = []
for label, extra in modes:
    waits, failed, _ = run(n, k, h, extra)
    series.append((label, waits, failed))
    print(f"{label}: {len(waits)} writes, {failed} failed, max wait {max(waits or [0]):.0f} ms")
cdf_plot(series)

counts = [1, 2, 4, 8, 16, 32]
rates = {label: [] for label, _ in modes[:2]}
for c in counts:
    for label, extra in modes[:2]:
        _, failed, rate = run(c, total // c, 0, extra)
        rates[label].append(rate)
        print(f"{c} processes, {label}: {rate:.0f} writes/s, {failed} failed")
throughput_plot(counts, [(label, r) for label, r in rates.items()])
print("wrote docs/contention-cdf.svg and docs/throughput.svg")
