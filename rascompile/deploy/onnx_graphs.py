"""The ONNX graphs of an export directory against its manifest: their opset, the external data files they name, and
their inputs and outputs (names, dtypes, static shapes) against the step signature the manifest describes."""

from __future__ import annotations

from pathlib import Path

from .manifest import ManifestError, signature_of, where

ONNX_ELEM_TYPES = {  # onnx.TensorProto data types
    "float32": 1,
    "uint8": 2,
    "int8": 3,
    "int16": 5,
    "int32": 6,
    "int64": 7,
    "bool": 9,
    "float16": 10,
    "float64": 11,
    "bfloat16": 16,
}


def onnx_opset(model) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def external_data_files(model) -> list[str]:
    """The ``location`` of every tensor the model keeps in an external file (subgraphs included)."""
    locations: list[str] = []

    def tensors(graph):
        yield from graph.initializer
        yield from (s.values for s in graph.sparse_initializer)
        yield from (s.indices for s in graph.sparse_initializer)
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t
                yield from attribute.tensors
                if attribute.HasField("g"):
                    yield from tensors(attribute.g)
                for sub in attribute.graphs:
                    yield from tensors(sub)

    for tensor in tensors(model.graph):
        if tensor.data_location == 1:  # TensorProto.EXTERNAL
            entries = {e.key: e.value for e in tensor.external_data}
            locations.append(entries.get("location", ""))
    for function in model.functions:
        for node in function.node:
            for attribute in node.attribute:
                if attribute.HasField("t") and attribute.t.data_location == 1:
                    locations.append({e.key: e.value for e in attribute.t.external_data}.get("location", ""))
    return sorted(set(locations))


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_onnx_graph(directory: str | Path, manifest: dict, graph: str, model) -> None:
    """The ONNX model ``graph`` ("dense" or "ras") against the manifest: opset, input and output names
    in order, dtypes and static shapes."""
    name = manifest[graph]
    prefix = f"{where(directory)}: {name}"
    opset = onnx_opset(model)
    if opset != manifest["opset"]:
        raise ManifestError(f"{where(directory)}: field 'opset' is {manifest['opset']}; {name} has opset {opset}")
    signature = signature_of(directory, manifest)
    # (name, shape, dtype, the manifest field that says so) of each input and output, in the signature's order
    expected_inputs = [(r["name"], r["shape"], r["dtype"], f"inputs[{i}]") for i, r in enumerate(manifest["inputs"])]
    outputs = [(o, None, None, f"outputs[{i}]") for i, o in enumerate(manifest["outputs"])]
    if graph == "ras":
        cache_fields = ["output_cache", *(f"kv_caches[{i}]" for i in range(len(signature.kv_caches)))]
        caches = [
            (c.name, list(c.shape), _dtype_name(c.dtype), field) for c, field in zip(signature.caches, cache_fields)
        ]
        active_idx = (signature.active_idx, [signature.batch_size, None], "int64", "batch_size")
        expected_inputs = list(signature.bind(expected_inputs, active_idx, caches[0], caches[1:]))
        updated = [(name, *rest) for name, (_, *rest) in zip(signature.updated_cache_names, caches)]
        outputs += updated
    caches = ", 'output_cache' and 'kv_caches'" if graph == "ras" else ""
    actual_inputs, actual_outputs = list(model.graph.input), list(model.graph.output)
    if [i.name for i in actual_inputs] != [e[0] for e in expected_inputs]:
        got = ", ".join(i.name for i in actual_inputs)
        want = ", ".join(e[0] for e in expected_inputs)
        raise ManifestError(f"{prefix} takes the inputs ({got}); the manifest's fields 'inputs'{caches} say ({want})")
    if [o.name for o in actual_outputs] != [e[0] for e in outputs]:
        got = ", ".join(o.name for o in actual_outputs)
        want = ", ".join(e[0] for e in outputs)
        raise ManifestError(f"{prefix} has the outputs ({got}); the manifest's fields 'outputs'{caches} say ({want})")
    kinds = ["input"] * len(actual_inputs) + ["output"] * len(actual_outputs)
    for kind, value, (tensor_name, shape, dtype, field) in zip(
        kinds, actual_inputs + actual_outputs, expected_inputs + outputs
    ):
        tensor_type = value.type.tensor_type
        if dtype is not None and tensor_type.elem_type != ONNX_ELEM_TYPES[dtype]:
            raise ManifestError(
                f"{prefix}'s {kind} {tensor_name!r} has ONNX element type {tensor_type.elem_type}; field "
                f"{field!r} says {dtype} (ONNX type {ONNX_ELEM_TYPES[dtype]})"
            )
        if shape is None:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        if len(dims) != len(shape) or any(a is not None and b is not None and a != b for a, b in zip(dims, shape)):
            shown = [d if d is not None else "?" for d in dims]
            raise ManifestError(
                f"{prefix}'s {kind} {tensor_name!r} has shape {shown}; field {field!r} says "
                f"{[d if d is not None else 'k' for d in shape]}"
            )
