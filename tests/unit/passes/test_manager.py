"""PassManager: passes run in order, and a pass can be registered at an index or before or after a named pass."""

import pytest
import torch

from rascompile.passes.context import PassContext
from rascompile.passes.manager import PassManager
from rascompile.passes.pipeline import RAS_PASSES
from rascompile.passes.settings import PassSettings


def _recorder(name, seen):
    def fn(gm, ctx):
        seen.append(name)
        return gm

    fn.__name__ = name
    return fn


def _graph():
    return torch.fx.symbolic_trace(torch.nn.Linear(2, 2))


def _manager(seen, names=("a", "b", "c")):
    return PassManager([_recorder(n, seen) for n in names])


def test_passes_run_in_order():
    seen = []
    _manager(seen)(_graph(), PassContext())
    assert seen == ["a", "b", "c"]


@pytest.mark.parametrize(
    "where, order",
    [
        ({"index": 0}, ["new", "a", "b", "c"]),
        ({"index": -1}, ["a", "b", "new", "c"]),
        ({"index": 3}, ["a", "b", "c", "new"]),
        ({"before": "a"}, ["new", "a", "b", "c"]),
        ({"before": "c"}, ["a", "b", "new", "c"]),
        ({"after": "b"}, ["a", "b", "new", "c"]),
        ({"after": "c"}, ["a", "b", "c", "new"]),
    ],
)
def test_insert_at_an_index_or_next_to_a_named_pass(where, order):
    seen = []
    manager = _manager(seen)
    new = _recorder("new", seen)
    assert manager.insert(new, **where) is new
    manager(_graph(), PassContext())
    assert seen == order


def test_insert_refuses_unknown_names_and_ambiguous_places():
    manager = _manager([])
    with pytest.raises(ValueError, match="no pass named 'x' in this pass manager \\(a, b, c\\)"):
        manager.insert(_recorder("new", []), before="x")
    with pytest.raises(TypeError, match="exactly one of index, before and after"):
        manager.insert(_recorder("new", []), before="a", after="b")
    with pytest.raises(TypeError, match="exactly one"):
        manager.insert(_recorder("new", []))
    twice = _manager([], names=("a", "a"))
    with pytest.raises(ValueError, match="2 passes named 'a'"):
        twice.insert(_recorder("new", []), after="a")


def test_remove_and_index():
    seen = []
    manager = _manager(seen)
    assert manager.index("b") == 1
    assert manager.remove("b").__name__ == "b"
    manager(_graph(), PassContext())
    assert seen == ["a", "c"]


def test_a_pass_registered_into_the_ras_pipeline_runs_at_its_place(tmp_path):
    """Registration on a copy of RAS_PASSES: the dump files number the new pass where it was put."""
    manager = PassManager(RAS_PASSES.passes)
    manager.insert(_recorder("probe", []), after="gather_active_tokens")
    assert manager.index("probe") == RAS_PASSES.index("gather_active_tokens") + 1
    assert len(RAS_PASSES.passes) == len(manager.passes) - 1  # the shared pipeline is untouched

    seen = []
    dumping = _manager(seen, names=("a",))
    dumping.insert(_recorder("b", seen), after="a")
    dumping(_graph(), PassContext(settings=PassSettings(dump_dir=str(tmp_path))))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00_a.after.py",
        "00_a.before.py",
        "01_b.after.py",
        "01_b.before.py",
    ]
