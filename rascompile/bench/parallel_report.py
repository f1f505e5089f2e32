"""The per-rank table of ``rascompile bench --context-parallel P`` (``results["context_parallel"]``, see
:mod:`rascompile.bench.parallel`), which ``report.format_report`` puts before rank 0's tables."""

from __future__ import annotations

from .report import _ms, _table


def _size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "n/a"
    if num_bytes >= 2**20:
        return f"{num_bytes / 2**20:.1f} MiB"
    return f"{num_bytes / 2**10:.1f} KiB"


def _speedup(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def format_ranks(results: dict) -> str:
    """Every rank's dense and RAS step times, loop times and cache bytes."""
    cp, s = results["context_parallel"], results["settings"]
    degree, ranks = cp["degree"], cp["ranks"]
    heads = results["model"].get("heads")
    out = [
        f"Context parallelism: diffusers Ulysses, degree {degree} ({degree} processes, process group "
        f"{cp['process_group_backend']}, attention backend {cp['attention_backend']})",
        "  every rank runs the same program on the same inputs: a dense step splits the tokens over the ranks, a RAS "
        f"step gives each rank 1/{degree} of the active tokens; each rank holds the K/V caches of "
        + (f"{heads // degree} of the {heads} heads" if heads else f"1/{degree} of the heads")
        + ", and the whole output cache. The tables after this one are rank 0's.",
    ]
    first = next((r for r in ranks if r["ras_applies"]), None)
    ras_head = f"RAS ms (ratio {first['ras_step_ratio']:g}, k={first['ras_step_k']})" if first else "RAS ms"
    headers = ["rank", "dense ms", ras_head, "speedup", "loop dense ms/step", "loop RAS ms/step", "loop speedup"]
    headers += ["K/V caches", "output cache", "caches held"]
    rows = []
    for r in ranks:
        applies = r["ras_applies"]
        rows.append(
            [
                str(r["rank"]),
                _ms(r["dense_step_s"]),
                _ms(r.get("ras_step_s")),
                _speedup(r.get("step_speedup")),
                _ms(r.get("loop_dense_s_per_step")),
                _ms(r.get("loop_ras_s_per_step")),
                _speedup(r.get("loop_speedup")),
                _size(r.get("kv_cache_bytes")) if applies else "n/a",
                _size(r.get("output_cache_bytes")) if applies else "n/a",
                _size(r.get("cache_bytes")) if applies else "n/a",
            ]
        )
    out.append(_table(headers, rows, right=[True] * len(headers)))
    repeats, loop_repeats = s["repeats"], s["loop_repeats"] or s["repeats"]
    out.append(
        f"  dense / RAS ms: one transformer call on this rank (compiled dense graph; RAS graph at the loop's ratio), "
        f"median of {repeats} interleaved calls"
    )
    out.append(
        f"  loop: whole {s['steps']}-step generations, dense compiled vs RAS compiled, median of {loop_repeats}; "
        "speedup = dense / RAS"
    )
    if first is not None:
        branches = first["cache_branches"]
        per = f" ({branches} guidance branches, one cache set each)" if branches > 1 else ""
        shape = "x".join(map(str, first["kv_cache_shape"] or []))
        out.append(
            f"  K/V caches: this rank's heads of every image token ([{shape}] per cache), 1/{degree} of one "
            f"process's; output cache: replicated on every rank; caches held: the controller's peak over a "
            f"generation{per}"
        )
    for r in ranks:
        if not r["ras_applies"]:
            out.append(f"  rank {r['rank']}: RAS does not apply ({r['ras_reason']}); dense only")
    load = results.get("background_load")
    if load is not None and "other_ranks_cores" in load:
        out.append(
            f"  the other ranks kept {load['other_ranks_cores']:.2f} cores busy during rank 0's run; the "
            "'other processes' of the run line are those outside the ranks"
        )
    return "\n".join(out)
