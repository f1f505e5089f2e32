"""RAS vs dense steps of the exported ONNX graphs on onnxruntime: ``python benchmarks/onnx_speed.py``.

Builds the SD3-shaped transformer of ``rascompile bench`` (random weights; ``--smoke`` for the tiny
one), exports it with ``rascompile.export``, and times one step of ``dense.onnx`` and of ``ras.onnx``
at several sample ratios in the same process (median of ``--repeats``), with the execution
providers given (CPU by default). Prints the machine and a table; ``--json PATH`` writes it too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

import rascompile
from rascompile import RASConfig
from rascompile.bench.runner import SMOKE, BenchSettings, build_model, machine_info, make_inputs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.75,0.5,0.25,0.125", help="comma-separated sample ratios")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per graph; median (default 5)")
    parser.add_argument("--providers", default="CPUExecutionProvider", help="comma-separated ORT providers")
    parser.add_argument("--smoke", action="store_true", help="the tiny model of rascompile bench --smoke")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    import onnxruntime as ort

    settings = BenchSettings(**(SMOKE if args.smoke else {}))
    model, inputs = build_model(settings), make_inputs(settings)
    backend = rascompile.RASBackend(RASConfig(num_inference_steps=2, scheduler_start_step=1, error_reset_steps=()))
    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=False)(
            hidden_states=torch.cat([inputs.latents, inputs.latents]),
            timestep=torch.full((2,), 500.0),
            encoder_hidden_states=inputs.prompt_embeds,
            pooled_projections=inputs.pooled,
            return_dict=False,
        )
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        exported = rascompile.export(backend, directory)
        export_s = time.perf_counter() - start
        signature = exported.signature
        graph = backend.graphs[0]
        values = signature.placeholder_values(graph.signature.input_names, graph.example_inputs)
        feeds = {name: value.numpy() for name, value in signature.feeds(values).items()}
        providers = args.providers.split(",")
        dense = ort.InferenceSession(str(exported.dense), providers=providers)
        ras = ort.InferenceSession(str(exported.ras), providers=providers)
        caches = {c.name: np.zeros(c.shape, np.float32) for c in signature.caches}

        def timed(session, extra) -> float:
            session.run(None, feeds | extra)  # warm-up
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                session.run(None, feeds | extra)
                times.append(time.perf_counter() - start)
            return statistics.median(times)

        n, batch = signature.num_tokens, signature.batch_size
        rows = [{"variant": "dense.onnx", "k": n, "ms": 1e3 * timed(dense, {})}]
        for ratio in (float(r) for r in args.ratios.split(",")):
            k = n - RASConfig(sample_ratio=ratio).static_num_dropped(n)
            gen = torch.Generator().manual_seed(k)
            idx = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(batch)]).numpy()
            rows.append(
                {
                    "variant": f"ras.onnx ratio {ratio:g}",
                    "k": k,
                    "ms": 1e3 * timed(ras, caches | {signature.active_idx: idx}),
                }
            )
    for row in rows:
        row["speedup"] = rows[0]["ms"] / row["ms"]
    machine = machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores; onnxruntime {ort.__version__}, providers {providers}")
    print(
        f"model: SD3Transformer2DModel, random weights, {settings.layers} layers, hidden {settings.hidden}, "
        f"{n} image tokens, CFG batch {batch}, fp32; export took {export_s:.1f} s; median of {args.repeats}"
    )
    print(f"{'variant':<24} {'k':>5} {'ms':>8} {'speedup':>8}")
    for row in rows:
        print(f"{row['variant']:<24} {row['k']:>5} {row['ms']:>8.1f} {row['speedup']:>7.2f}x")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"machine": machine, "onnxruntime": ort.__version__, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
