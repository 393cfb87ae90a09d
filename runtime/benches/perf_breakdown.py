#!/usr/bin/env python3
"""Groups a flat perf profile of a stage call by where the time went.

perf report -i stage.data --no-children --sort dso,symbol | python3 runtime/benches/perf_breakdown.py

Guest functions show as `[JIT]` with `plugin!function` names when the host
wrote the perf map (`[plugins] perf_map_max_bytes`; the stage_call bench's
profile mode does). Prints the share of samples per group, largest first.
"""
import re
import sys

GUEST = [
    ("guest: allocation, freeing, drops",
     r"dlmalloc|dlfree|!malloc$|!free$|realloc|__rust_alloc|__rust_dealloc|__rdl_|alloc_shim|cabi_dealloc|finish_grow|do_reserve|drop_in_place"),
    ("guest: JSON parsing", r"serde|parse|telemetry|Deserial|from_utf8|memchr|skip_to_escape"),
    ("guest: text formatting", r"fmt|format|flt2dec|bignum|float_to_decimal|write_str|Formatter"),
    ("guest: hashing", r"sip|hash|Hash"),
]

LINE = re.compile(r"\s*([\d.]+)%\s+(\[JIT\] tid \d+|\S+)\s+\[.\]\s+(.*?)\s*$")


def group(dso, sym):
    if dso.startswith("[JIT]"):
        for name, pattern in GUEST:
            if re.search(pattern, sym):
                return name
        return "guest: other"
    if "libc" in dso:
        return "host: malloc/free" if re.search(r"malloc|free|_int_", sym) else "host: libc other (memcpy)"
    if "kernel" in dso:
        return "kernel"
    if re.search(r"wasmtime|cranelift|regalloc", sym):
        return "host: wasmtime (call, lower, lift, fiber)"
    if "ganglion" in sym:
        return "host: ganglion (conversions, checks)"
    if "tokio" in sym:
        return "host: tokio"
    return "other"


def main():
    shares = {}
    for line in sys.stdin:
        m = LINE.match(line)
        if not m:
            continue
        key = group(m.group(2), m.group(3))
        shares[key] = shares.get(key, 0.0) + float(m.group(1))
    if not shares:
        sys.exit("no samples read: pipe `perf report --no-children --sort dso,symbol` in")
    for key, share in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"{share:5.1f} %  {key}")


if __name__ == "__main__":
    main()
