"""Export directories are data: manifests are checked, files confined and checksummed, nothing is
unpickled without trust=True, and a failed export leaves nothing behind."""

import copy
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import onnx
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import rascompile
from rascompile import ExportError, OnnxRunner, RASConfig
from rascompile.deploy import onnx_export, tensorrt
from rascompile.deploy.manifest import MANIFEST, ManifestError, UntrustedExportError
from tests.support.models import sd3_call_kwargs, tiny_sd3_pipeline

CONFIG = RASConfig(num_inference_steps=8, sample_ratio=0.5, scheduler_start_step=2, error_reset_steps=(5,))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny SD3 model exported once (a real export, checked with onnxruntime), its backend, and the
    noise prediction of a whole RAS generation on onnxruntime from the untouched directory."""
    torch._dynamo.reset()
    pipe = tiny_sd3_pipeline()
    backend = rascompile.apply(pipe, CONFIG, inner_backend="aot_eager")
    pipe(**sd3_call_kwargs(steps=8))
    directory = tmp_path_factory.mktemp("safety") / "export"
    result = rascompile.export(backend, directory)
    torch._dynamo.reset()
    reference = _generation(OnnxRunner(directory, CONFIG))
    return types.SimpleNamespace(directory=directory, result=result, backend=backend, reference=reference)


def _generation(runner) -> torch.Tensor:
    pipe = tiny_sd3_pipeline()
    runner.for_pipeline(pipe)
    return pipe(**sd3_call_kwargs(steps=8))[0]


def _manifest(directory: Path) -> dict:
    return json.loads((directory / MANIFEST).read_text())


def _write_manifest(directory: Path, manifest) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture
def copy_dir(exported, tmp_path):
    """A private copy of the export to break."""
    target = tmp_path / "copy"
    shutil.copytree(exported.directory, target)
    return target


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (opening a FIFO blocks until a writer comes)."""

    def expire(*_):
        raise TimeoutError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------------------------------ item 9


def test_export_records_the_sha256_of_every_file(exported):
    manifest = _manifest(exported.directory)
    assert manifest["format"] == 2 and manifest["runtime"] == "onnx"
    files = sorted(p.name for p in exported.directory.iterdir() if p.name != MANIFEST)
    assert sorted(manifest["sha256"]) == files == ["dense.onnx", "ras.onnx"]
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((exported.directory / name).read_bytes()).hexdigest() == digest


@pytest.mark.parametrize(
    "name", ["../outside/evil.onnx", "/etc/passwd", "sub/ras.onnx", "..", "ras.onnx\x00", "C:\\ras.onnx"]
)
def test_paths_outside_the_directory_are_refused(copy_dir, name):
    manifest = _manifest(copy_dir)
    manifest["ras"] = name
    if "sha256" in manifest:  # (so that, without the fix, the test fails on the path and not on this)
        manifest["sha256"][name] = manifest["sha256"]["ras.onnx"]
    _write_manifest(copy_dir, manifest)
    with pytest.raises(ManifestError, match=rf"{MANIFEST} in .*: field 'ras' is .*no paths"):
        OnnxRunner(copy_dir, CONFIG)


def test_symlinks_must_resolve_inside_the_directory(copy_dir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(copy_dir / "ras.onnx", outside / "ras.onnx")
    (copy_dir / "ras.onnx").symlink_to(outside / "ras.onnx")
    with pytest.raises(ManifestError, match=r"field 'ras' names 'ras.onnx', which resolves to .*outside the export"):
        OnnxRunner(copy_dir, CONFIG)
    # a link that stays inside the directory is fine
    (copy_dir / "ras.onnx").unlink()
    (copy_dir / "sub").mkdir()
    shutil.move(outside / "ras.onnx", copy_dir / "sub" / "ras.onnx")
    (copy_dir / "ras.onnx").symlink_to(Path("sub") / "ras.onnx")
    OnnxRunner(copy_dir, CONFIG)


def test_a_fifo_is_never_opened(copy_dir):
    (copy_dir / "ras.onnx").unlink()
    os.mkfifo(copy_dir / "ras.onnx")
    with deadline(20), pytest.raises(ManifestError, match=r"field 'ras' names 'ras.onnx', which is a FIFO"):
        OnnxRunner(copy_dir, CONFIG)
    (copy_dir / MANIFEST).unlink()
    os.mkfifo(copy_dir / MANIFEST)
    with deadline(20), pytest.raises(ManifestError, match=r"the manifest is a FIFO \(named pipe\), not a regular"):
        OnnxRunner(copy_dir, CONFIG)


def test_files_must_match_their_checksums(copy_dir):
    shutil.copy(copy_dir / "dense.onnx", copy_dir / "ras.onnx")  # a valid ONNX file, the wrong one
    with pytest.raises(ManifestError, match=r"ras.onnx does not match field 'sha256.ras.onnx' .* export again"):
        OnnxRunner(copy_dir, CONFIG)
    manifest = _manifest(copy_dir)
    del manifest["sha256"]["ras.onnx"]
    _write_manifest(copy_dir, manifest)
    with pytest.raises(ManifestError, match=r"field 'ras' names 'ras.onnx', which has no checksum in field 'sha256'"):
        OnnxRunner(copy_dir, CONFIG)


def test_manifests_without_checksums_are_refused(copy_dir):
    """Format 1 (before checksums): refused with a message to export again."""
    manifest = _manifest(copy_dir)
    manifest["format"] = 1
    manifest.pop("sha256", None), manifest.pop("runtime", None)
    _write_manifest(copy_dir, manifest)
    with pytest.raises(ManifestError, match=r"field 'format' is 1: .* no SHA-256 checksums .* export the model again"):
        OnnxRunner(copy_dir, CONFIG)


def test_external_data_is_confined_and_checksummed(copy_dir, exported):
    """Tensors an ONNX file keeps in another file: that file is held to the manifest's rules too."""
    model = onnx.load(str(copy_dir / "ras.onnx"))
    onnx.save_model(model, str(copy_dir / "ras.onnx"), save_as_external_data=True, location="ras.data")
    manifest = _manifest(copy_dir)
    manifest["sha256"]["ras.onnx"] = hashlib.sha256((copy_dir / "ras.onnx").read_bytes()).hexdigest()
    _write_manifest(copy_dir, manifest)
    with pytest.raises(ManifestError, match=r"field 'sha256' has no checksum for 'ras.data'"):
        OnnxRunner(copy_dir, CONFIG)
    manifest["sha256"]["ras.data"] = hashlib.sha256((copy_dir / "ras.data").read_bytes()).hexdigest()
    _write_manifest(copy_dir, manifest)
    assert torch.equal(_generation(OnnxRunner(copy_dir, CONFIG)), exported.reference)
    # an external location outside the directory
    model = onnx.load(str(copy_dir / "ras.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../ras.data"
    (copy_dir / "ras.onnx").write_bytes(model.SerializeToString())
    manifest["sha256"]["ras.onnx"] = hashlib.sha256((copy_dir / "ras.onnx").read_bytes()).hexdigest()
    _write_manifest(copy_dir, manifest)
    with pytest.raises(ManifestError, match=r"field 'ras \(external data of ras.onnx\)' is '../ras.data'.*no paths"):
        OnnxRunner(copy_dir, CONFIG)


# ------------------------------------------------------------------------------------------------ item 11


@pytest.mark.parametrize(
    "text, message",
    [
        ("{", r"not valid JSON: Expecting property name"),
        ("[1, 2]", r"the file holds a JSON array; must be a JSON object"),
        ('{"format": 2, "format": 2}', r"field 'format' appears twice"),
        ('{"format": NaN}', r"NaN is not a JSON number"),
        (b"\xff\xfe", r"not UTF-8 text"),
        ("[" * 5000 + "]" * 5000, r"JSON nested too deeply"),
    ],
)
def test_broken_json_names_the_file(copy_dir, text, message):
    path = copy_dir / MANIFEST
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ManifestError, match=rf"^{MANIFEST} in {re.escape(str(copy_dir))}: {message}"):
        OnnxRunner(copy_dir, CONFIG)


def _set(manifest, path, value):
    node = manifest
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value


_DELETE = object()


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("batch_size",), 10**12, r"field 'batch_size' is 1000000000000; must be an integer from 1 to 4096"),
        (("batch_size",), "2", r"field 'batch_size' is '2'; must be an integer"),
        (("batch_size",), 3, r"field 'batch_size' is 3; must equal B = 2 of the latents \(field 'inputs\[0\].shape'\)"),
        (("num_tokens",), -1, r"field 'num_tokens' is -1; must be an integer from 1 to"),
        (("num_tokens",), 32, r"field 'num_tokens' is 32; must equal \(H / p\) \* \(W / p\) = 64"),
        (("inputs",), _DELETE, r"field 'inputs' is missing"),
        (("inputs", 0, "shape"), None, r"field 'inputs\[0\].shape' is null; must be a JSON array"),
        (("inputs", 0, "dtype"), "load", r"field 'inputs\[0\].dtype' is 'load'; must be one of 'float32'"),
        (("output_cache", "shape", 1), 10**6, r"field 'output_cache.shape' is \[2, 1000000, 16\]; must be \[B, N, C\]"),
        (("kv_caches", 0, "shape"), [2, 4, 10**8, 8], r"field 'kv_caches\[0\].shape\[2\]' is 100000000; must be an"),
        (
            ("kv_caches", 0, "shape"),
            [2, 2**20, 2**20, 8],
            r"field 'kv_caches\[0\].shape' .* at most 4294967296 elements",
        ),
        (("kv_caches", 1), "x", r"field 'kv_caches\[1\]' is 'x'; must be a JSON object with fields name, shape"),
        (("kv_caches", 1, "kind"), "query", r"field 'kv_caches\[1\].kind' is 'query'; must be one of 'key', 'value'"),
        (("latents",), "pooled_projections", r"field 'inputs\[2\].shape' is \[2, 16\]; the latents \(field 'lat"),
        (("latents",), "timestep", r"field 'timestep' is 'timestep'; must be null or the name of an input other"),
        (("timestep",), "encoder_hidden_states", r"the timestep \(field 'timestep' is 'encoder_hidden_states'\)"),
        (("opset",), 5, r"field 'opset' is 5; must be an integer from 7 to 99"),
        (("opset",), 19, r"field 'opset' is 19; dense.onnx has opset 18"),
        (("surprise",), 1, r"unknown field\(s\) 'surprise'"),
        (("inputs", 3, "shape", 1), 8, r"dense.onnx's input 'encoder_hidden_states' has shape \[2, 7, 32\]; field "),
        (("kv_caches", 2, "shape", 2), 72, r"ras.onnx's input 'ras_kv_cache_2' has shape \[2, 4, 64, 8\]; field 'kv_"),
        (("output_cache", "dtype"), "float16", r"ras.onnx's input 'ras_output_cache' has ONNX element type 1; field"),
        (("inputs", 2, "name"), "pooled", r"dense.onnx takes the inputs \(.*pooled_projections.*\); the manifest's"),
        (
            ("outputs",),
            ["noise"],
            r"dense.onnx has the outputs \(sample\); the manifest's fields 'outputs' say \(noise\)",
        ),
        (("runtime",), "torch-tensorrt", r"field 'dense' is 'dense.onnx'; .* \(field 'runtime' is 'torch-tensorrt'\)"),
    ],
)
def test_manifest_errors_name_the_file_and_the_field(copy_dir, path, value, message):
    manifest = _manifest(copy_dir)
    _set(manifest, path, value)
    _write_manifest(copy_dir, manifest)
    with pytest.raises(ManifestError, match=rf"^{MANIFEST} in {re.escape(str(copy_dir))}: .*{message}"):
        OnnxRunner(copy_dir, CONFIG)


# ------------------------------------------------------------------------------------------------ hypothesis


def _paths(node, prefix=()):
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return
    for key, value in items:
        yield (*prefix, key)
        yield from _paths(value, (*prefix, key))


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, -1, 1, 2, 3, 7, 63, 64, 65, 4096, 10**12, 2**63, -(2**70)]),
    st.integers(-(10**15), 10**15),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(
        ["../outside/evil.onnx", "/etc/passwd", "dense.onnx", "ras.onnx", "", "float16", "int64", "key", "value"]
        + ["timestep", "hidden_states", "encoder_hidden_states", "ras_output_cache", "ras_kv_cache_0", "sample"]
        + ["torch-tensorrt", "onnx", "a" * 64, "0" * 64]
    ),
    st.text(max_size=12),
    st.lists(st.integers(-3, 10**13), max_size=5),
    st.dictionaries(st.sampled_from(["name", "shape", "dtype", "x"]), st.integers(0, 3), max_size=3),
)


def _get(manifest, path):
    for key in path:
        manifest = manifest[key]
    return manifest


def _nearby(value):
    if isinstance(value, bool) or value is None:
        return _VALUES
    if isinstance(value, int):
        return st.one_of(st.integers(value - 2, value + 2), st.sampled_from([0, 2 * value, value * 10**6, -value]))
    if isinstance(value, str):
        return st.sampled_from([value, value + "x", value.upper(), value[:-1], "../" + value, "/tmp/" + value])
    if isinstance(value, list) and value:
        return st.one_of(
            st.just(value[1:]), st.just(value[:-1]), st.just(value + value[-1:]), st.just(value[::-1]), st.just([])
        )
    if isinstance(value, dict) and value:
        return st.sampled_from(sorted(value)).map(lambda k: {n: v for n, v in value.items() if n != k})
    return _VALUES


@pytest.fixture(scope="module")
def mutable_dir(exported, tmp_path_factory):
    target = tmp_path_factory.mktemp("mutations") / "export"
    shutil.copytree(exported.directory, target)
    return target


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_manifests_fail_naming_the_field_or_run_the_same(exported, mutable_dir, data):
    """Any change to a valid manifest is refused with a ValueError that names the field it touched,
    or gives a runner whose whole generation equals the untouched one."""
    original = _manifest(exported.directory)
    manifest = copy.deepcopy(original)
    paths = list(_paths(manifest))
    path = data.draw(st.sampled_from(paths), label="path")
    action = data.draw(st.sampled_from(["delete", "replace", "nearby", "nearby", "add"]), label="action")
    if action == "delete":
        _set(manifest, path, _DELETE)
    elif action == "replace":
        _set(manifest, path, data.draw(_VALUES, label="value"))
    elif action == "nearby":  # a value of the same kind, often plausible
        _set(manifest, path, data.draw(_nearby(_get(manifest, path)), label="value"))
    else:  # a new field beside it (or at the top)
        parent = manifest
        for key in path[:-1]:
            parent = parent[key]
        if not isinstance(parent, dict):
            parent, path = manifest, ("extra",)
        else:
            path = (*path[:-1], "extra")
        parent["extra"] = data.draw(_VALUES, label="value")
    field = path[0]
    _write_manifest(mutable_dir, manifest)
    try:
        runner = OnnxRunner(mutable_dir, CONFIG)
    except ValueError as exc:
        message = str(exc)
        assert message.startswith(f"{MANIFEST} in {mutable_dir}: "), message
        assert f"'{field}" in message, f"{path}: {message}"
        event("refused")
        return
    event("accepted")
    assert action != "add", f"an unknown field {path} was accepted"
    assert torch.equal(_generation(runner), exported.reference), f"{path} changed the outputs"


# ------------------------------------------------------------------------------------------------ item 13


@pytest.fixture
def fast_export(exported, monkeypatch):
    """``rascompile.export`` with the ONNX exporter replaced by a copy of the files the real export
    wrote (the staging, the opset read-back, the checksums and the onnxruntime check still run)."""

    def copy_file(module, args, input_names, output_names, dynamic, opset, path):
        shutil.copy(exported.directory / path.name, path)

    monkeypatch.setattr(onnx_export, "_export_onnx", copy_file)
    return lambda directory, **kwargs: rascompile.export(exported.backend, directory, **kwargs)


def test_a_failed_export_leaves_an_earlier_one_as_it_was(exported, fast_export, tmp_path, monkeypatch):
    target = tmp_path / "out"
    shutil.copytree(exported.directory, target)
    (target / "dense.engine").write_bytes(b"an engine of the earlier export")
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def fail(*_):
        raise ExportError("ras.onnx: onnxruntime output sample differs from PyTorch by 1")

    check = onnx_export._check_with_onnxruntime
    monkeypatch.setattr(onnx_export, "_check_with_onnxruntime", fail)
    with pytest.raises(ExportError, match="differs from PyTorch"):
        fast_export(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "the staging directory was left behind"
    with pytest.raises(ExportError, match="differs from PyTorch"):
        fast_export(tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "a failed export left a directory"
    monkeypatch.setattr(onnx_export, "_check_with_onnxruntime", check)
    fast_export(target)  # over the earlier export: replaced whole
    assert sorted(p.name for p in target.iterdir()) == sorted(["dense.onnx", "ras.onnx", MANIFEST])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    OnnxRunner(target, CONFIG)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_user_data_is_never_replaced(exported, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "photo.png").write_bytes(b"png")
    with pytest.raises(ExportError, match=rf"{mine} is not empty \(photo.png\) and holds no {MANIFEST}"):
        rascompile.export(exported.backend, mine)
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    with pytest.raises(ExportError, match=rf"output path {afile} exists and is a regular file, not a directory"):
        rascompile.export(exported.backend, afile)
    assert afile.read_text() == "mine"
    shutil.copytree(exported.directory, tmp_path / "both")
    (tmp_path / "both" / "photo.png").write_bytes(b"png")
    with pytest.raises(ExportError, match=r"holds an earlier rascompile export and also photo.png"):
        rascompile.export(exported.backend, tmp_path / "both")
    assert (mine / "photo.png").read_bytes() == (tmp_path / "both" / "photo.png").read_bytes() == b"png"


# ------------------------------------------------------------------------------------------------ item 14


@pytest.mark.parametrize("opset", [5, 17, 24, 30, True, 18.0, "18", None])
def test_opset_is_validated_before_tracing(exported, tmp_path, opset):
    with pytest.raises(ValueError, match=rf"opset={opset!r} is invalid: must be an int from 18 to 23"):
        rascompile.export(exported.backend, tmp_path / "out", opset=opset)
    assert not (tmp_path / "out").exists()


def test_the_manifest_records_the_opset_the_files_have(fast_export, tmp_path):
    """The files (here: copies at opset 18) are read back; a request they do not honour is an error."""
    with pytest.raises(ExportError, match=r"torch.onnx wrote dense.onnx with opset 18, though opset=19 was asked"):
        fast_export(tmp_path / "out", opset=19)
    assert not (tmp_path / "out").exists()
    assert fast_export(tmp_path / "out").manifest["opset"] == 18


# ------------------------------------------------------------------------------------------------ item 17


def _inputs(exported):
    graph = exported.backend.graphs[0]
    return exported.result.signature.placeholder_values(graph.signature.input_names, graph.example_inputs)


def test_unknown_keyword_arguments_are_refused(exported):
    runner = OnnxRunner(exported.directory, RASConfig(sample_ratio=1.0))
    inputs = _inputs(exported)
    expected = runner(**inputs)[0]
    with pytest.raises(ValueError, match=r"keyword argument 'skip_layers' \(a list\) is not an input of the exported"):
        runner(**inputs, skip_layers=[0])
    with pytest.raises(ValueError, match=r"keyword argument 'controlnet_cond' \(a tensor\) is not an input"):
        runner(**inputs, controlnet_cond=torch.zeros(2))
    with pytest.raises(ValueError, match=r"keyword argument 'joint_attention_kwargs' \(a dict\) is not an input"):
        runner(**inputs, joint_attention_kwargs={"ip_adapter_image_embeds": torch.zeros(1)})
    # what the pipelines pass that carries no data for the graphs
    got = runner(**inputs, joint_attention_kwargs=None, skip_layers=None, attention_kwargs={}, return_dict=False)[0]
    assert torch.equal(got, expected)
    # option dicts fixed at tracing (LuminaPipeline's proportional attention): one value per runner
    runner(**inputs, cross_attention_kwargs={"base_sequence_length": 256})
    with pytest.raises(ValueError, match=r"cross_attention_kwargs=\{'base_sequence_length': 64\} differs from"):
        runner(**inputs, cross_attention_kwargs={"base_sequence_length": 64})
    with pytest.raises(ValueError, match=r"5 positional arguments; the exported model takes at most 4"):
        runner(*inputs.values(), torch.zeros(1))


def test_a_pipeline_option_the_graphs_cannot_take_is_refused(exported):
    pipe = tiny_sd3_pipeline()
    OnnxRunner(exported.directory, CONFIG).for_pipeline(pipe)
    with pytest.raises(ValueError, match=r"keyword argument 'skip_layers'"):
        pipe(**sd3_call_kwargs(steps=8), skip_guidance_layers=[0])


# ------------------------------------------------------------------------------------------------ item 10 (TensorRT)


class _Program(torch.nn.Module):
    def forward(self, x):
        return (x + 1,)


def _torch_tensorrt_dir(exported, directory: Path) -> Path:
    """A directory as compile_torch_tensorrt writes it, with plain torch.export programs (CPU)."""
    directory.mkdir()
    program = torch.export.export(_Program(), (torch.zeros(2),))
    for graph in ("dense", "ras"):
        torch.export.save(program, str(directory / f"{graph}.ep"))
    manifest = _manifest(exported.directory)
    del manifest["opset"]
    manifest |= {"runtime": "torch-tensorrt", "dense": "dense.ep", "ras": "ras.ep"}
    manifest["sha256"] = {n: hashlib.sha256((directory / n).read_bytes()).hexdigest() for n in ("dense.ep", "ras.ep")}
    _write_manifest(directory, manifest)
    return directory


def test_torch_tensorrt_runner_unpickles_nothing_without_trust(exported, tmp_path, monkeypatch):
    directory = _torch_tensorrt_dir(exported, tmp_path / "trt")
    loads = []
    monkeypatch.setattr(torch.export, "load", lambda f, *a, **k: loads.append(f))
    for trust in (False, "yes", 1):
        with pytest.raises(
            UntrustedExportError, match=r"unpickles them: a crafted file runs arbitrary code.*trust=True"
        ):
            tensorrt.TorchTensorRTRunner(directory, CONFIG, trust=trust)
    assert loads == []
    assert "trust=True" in tensorrt.TorchTensorRTRunner.__doc__
    # trusted: the checks still run first, then CUDA is required (none here)
    (directory / "ras.ep").write_bytes((directory / "ras.ep").read_bytes() + b"\0")
    with pytest.raises(ManifestError, match=r"ras.ep does not match field 'sha256.ras.ep'"):
        tensorrt.TorchTensorRTRunner(directory, CONFIG, trust=True)
    assert loads == []


def test_torch_tensorrt_runner_loads_the_checked_bytes(exported, tmp_path, monkeypatch):
    directory = _torch_tensorrt_dir(exported, tmp_path / "trt")
    monkeypatch.setattr(tensorrt, "_require_cuda", lambda what: None)
    monkeypatch.setitem(sys.modules, "torch_tensorrt", types.ModuleType("torch_tensorrt"))
    runner = tensorrt.TorchTensorRTRunner(directory, CONFIG, trust=True)
    assert torch.equal(runner.modules["ras"](torch.zeros(2))[0], torch.ones(2))
    with pytest.raises(ManifestError, match=r"field 'runtime' is 'onnx'; TorchTensorRTRunner runs directories"):
        tensorrt.TorchTensorRTRunner(exported.directory, CONFIG, trust=True)


def test_tensorrt_engines_are_checked_before_tensorrt_sees_them(copy_dir, monkeypatch):
    with pytest.raises(ManifestError, match=r"field 'engines' is missing: .*build_engines"):
        tensorrt.TensorRTRunner(copy_dir, CONFIG)
    for graph in ("dense", "ras"):
        (copy_dir / f"{graph}.engine").write_bytes(b"engine " + graph.encode())
    manifest = _manifest(copy_dir)
    manifest["engines"] = {"dense": "dense.engine", "ras": "ras.engine"}
    manifest["sha256"] |= {
        n: hashlib.sha256(b"engine " + n[:-7].encode()).hexdigest() for n in manifest["engines"].values()
    }
    _write_manifest(copy_dir, manifest)
    (copy_dir / "ras.engine").write_bytes(b"a crafted engine")
    with pytest.raises(ManifestError, match=r"ras.engine does not match field 'sha256.ras.engine'"):
        tensorrt.TensorRTRunner(copy_dir, CONFIG)
    assert "trusted native code" in tensorrt.TensorRTRunner.__doc__
    (copy_dir / "ras.onnx").write_bytes(b"not the exported graph")
    with pytest.raises(ManifestError, match=r"ras.onnx does not match field 'sha256.ras.onnx'"):
        tensorrt.build_engines(copy_dir)


def test_onnx_runner_refuses_a_torch_tensorrt_directory(exported, tmp_path):
    directory = _torch_tensorrt_dir(exported, tmp_path / "trt")
    with pytest.raises(ManifestError, match=r"field 'runtime' is 'torch-tensorrt'; this directory holds no ONNX"):
        OnnxRunner(directory, CONFIG)


def test_manifest_reading_is_bounded(copy_dir):
    manifest = _manifest(copy_dir)
    manifest["rewrite"] = ["x" * 1000] * 20_000  # 20 MB
    _write_manifest(copy_dir, manifest)
    with pytest.raises(ManifestError, match=r"is \d+ bytes; at most 16777216 are allowed"):
        OnnxRunner(copy_dir, CONFIG)


def test_onnxruntime_gets_the_bytes_that_were_checked(exported):
    """No second open by path between the checksum and onnxruntime."""
    from rascompile.deploy.onnx_runner import load_onnx_graphs

    models = load_onnx_graphs(exported.directory, _manifest(exported.directory))
    for graph in ("dense", "ras"):
        assert models[graph] == (exported.directory / f"{graph}.onnx").read_bytes()
