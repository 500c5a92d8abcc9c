"""Opening a table larger than you want to read: ``TagTable.open`` (memory-mapped) against ``TagTable.load``.

    python -m benchmarks.open_speed [--tags 10000] [--layers 70] [--dim 2048] [--dtype fp16] [--dir /tmp]

Writes one synthetic ``layers`` table (SDXL's 70 attn2 layers of width 2048 by default, fp16), then, each in a fresh
process so the page cache is what the OS left: the time to open it and encode one 8-tag prompt, and the peak RSS of
that process (``VmHWM``: ``ru_maxrss`` would keep the parent's peak across exec); the same through ``load``; and
extracting one tag into its own file (``condvec-merge extract`` reads through ``open``) and dropping one tag
(``condvec-merge drop`` streams rows from ``open`` into the new file) both ways.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

_CHILD = """
import json, sys, time
t0 = time.perf_counter()
from conditioner import TagTable, encode
imported = time.perf_counter()
table = getattr(TagTable, sys.argv[2])(sys.argv[1])
opened = time.perf_counter()
cond = encode(table, [", ".join(table.tags[i] for i in range(0, len(table.tags), len(table.tags) // 8))])
done = time.perf_counter()
print(json.dumps({"open_s": opened - imported, "encode_s": done - opened, "shape": list(cond.shape),
                  "peak_rss_mib": int(next(l.split()[1] for l in open("/proc/self/status")
                                           if l.startswith("VmHWM"))) / 1024}))
"""

# condvec-merge extract of one tag (the command reads the table with TagTable.open; "load" reads it whole)
_EXTRACT = """
import json, os, sys, tempfile, time
from conditioner import TagTable
from merge.tables import extract
t0 = time.perf_counter()
table = getattr(TagTable, sys.argv[2])(sys.argv[1])
out = os.path.join(tempfile.mkdtemp(), "one.safetensors")
extract(table, [table.tags[len(table.tags) // 2]]).save(out)
done = time.perf_counter()
print(json.dumps({"extract_s": done - t0, "out_kib": os.path.getsize(out) / 1024,
                  "peak_rss_mib": int(next(l.split()[1] for l in open("/proc/self/status")
                                           if l.startswith("VmHWM"))) / 1024}))
os.unlink(out)
"""


# condvec-merge drop of one tag: streamed from the memory-mapped table ("open"), or the table loaded whole
_DROP = """
import json, os, sys, tempfile, time
from conditioner import TagTable
from merge.tables import drop
t0 = time.perf_counter()
out = os.path.join(tempfile.mkdtemp(), "dropped.safetensors")
if sys.argv[2] == "open":
    table = TagTable.open(sys.argv[1])
    result = drop(table.skeleton(), [table.tags[0]])
    result.save_streamed(out, table, [table.index[n] for n in result.tags], dtype="fp16")
else:
    drop(TagTable.load(sys.argv[1]), [TagTable.open(sys.argv[1]).tags[0]]).save(out, dtype="fp16")
done = time.perf_counter()
print(json.dumps({"drop_s": done - t0, "out_gib": os.path.getsize(out) / 2**30,
                  "peak_rss_mib": int(next(l.split()[1] for l in open("/proc/self/status")
                                           if l.startswith("VmHWM"))) / 1024}))
os.unlink(out)
"""


def _write_table(path: str, tags: int, layers: int, dim: int, dtype: str) -> float:
    import torch

    from conditioner import LayerSpec, TagTable

    specs = [LayerSpec(name=f"block.{i}.attn2", short=f"L{i:02d}", block=f"block.{i // 10}", cross_dim=dim,
                       inner_dim=dim // 2, heads=8) for i in range(layers)]
    table = TagTable.create(specs, groups="layers")
    rows = 1000
    names = [f"tag {i}" for i in range(tags)]
    table.add_tags(names[:rows], init="zeros")
    block = torch.randn(rows, 1, table.width, generator=torch.Generator().manual_seed(0)) * 0.02
    table.data = block.repeat(-(-tags // rows), 1, 1)[:tags].clone()
    table.tags = names
    table.__post_init__()
    table.save(path, dtype=dtype)
    return os.path.getsize(path) / 2**30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.open_speed", description=__doc__.splitlines()[0])
    parser.add_argument("--tags", type=int, default=10000)
    parser.add_argument("--layers", type=int, default=70)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--dtype", default="fp16")
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args(argv)
    path = os.path.join(args.dir, f"condvec-open-{args.tags}x{args.layers}x{args.dim}.safetensors")
    started = time.perf_counter()
    size_gib = _write_table(path, args.tags, args.layers, args.dim, args.dtype)
    result = {"tags": args.tags, "layers": args.layers, "dim": args.dim, "dtype": args.dtype,
              "file_gib": round(size_gib, 2), "write_s": round(time.perf_counter() - started, 1)}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        for how in ("open", "load"):
            out = subprocess.run([sys.executable, "-c", _CHILD, path, how], capture_output=True, text=True, env=env,
                                 check=True).stdout
            result[how] = json.loads(out.strip().splitlines()[-1])
            out = subprocess.run([sys.executable, "-c", _EXTRACT, path, how], capture_output=True, text=True,
                                 env=env, check=True).stdout
            result[f"extract via {how}"] = json.loads(out.strip().splitlines()[-1])
            out = subprocess.run([sys.executable, "-c", _DROP, path, how], capture_output=True, text=True,
                                 env=env, check=True).stdout
            result[f"drop via {how}"] = json.loads(out.strip().splitlines()[-1])
    finally:
        os.unlink(path)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
