"""Reading collectives and their mesh axes from HLO text: listed and iota replica groups, permute
pairs, result bytes (of long tuples too), and the axes a grouping follows on a [data=2, expert=2, tensor=2] mesh."""

import pytest

from mesh.hlo_collectives import group_axes, parse

MESH = {"data": 2, "expert": 2, "tensor": 2}  # device id = 4*data + 2*expert + tensor
HLO = """
  %all-to-all.1 = f32[4,16,8]{2,1,0} all-to-all(f32[4,16,8]{2,1,0} %p), channel_id=1, replica_groups={{0,2},{1,3},{4,6},{5,7}}, dimensions={0}
  %ag = bf16[64,32]{1,0} all-gather(bf16[16,32]{1,0} %q), channel_id=2, replica_groups=[2,4]<=[2,4]T(1,0), dimensions={0}, use_global_device_ids=true
  %ars = (f32[8]{0}, s32[2]{0}) all-reduce-start(f32[8]{0} %a, s32[2]{0} %b), replica_groups=[4,2]<=[8], to_apply=%add
  %ard = (f32[8]{0}, s32[2]{0}) all-reduce-done((f32[8]{0}, s32[2]{0}) %ars)
  %cp = f32[3]{0} collective-permute(f32[3]{0} %c), source_target_pairs={{0,4},{4,0},{1,5},{5,1}}
  %rs = f32[2]{0} reduce-scatter(f32[8]{0} %d), replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}
  %ar2 = (f32[4]{0}, f32[2]{0}) all-reduce(f32[4]{0} %e, f32[2]{0} %f), replica_groups=mesh['axis_0'=1,'axis_1'=4,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_1'}, to_apply=%add
  %add.3 = f32[3]{0} add(f32[3]{0} %x, f32[3]{0} %y)
  %ar3 = (f32[], f32[4]{0}, f32[], f32[], f32[], /*index=5*/f32[2,3]{1,0}, s32[]) all-reduce(f32[] %g0, f32[4]{0} %g1, f32[] %g2, f32[] %g3, f32[] %g4, /*index=5*/f32[2,3]{1,0} %g5, s32[] %g6), replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add
"""


def test_parse_kinds_bytes_and_groups():
    found = parse(HLO)
    assert [c.kind for c in found] == [
        "all-to-all",
        "all-gather",
        "all-reduce",
        "collective-permute",
        "reduce-scatter",
        "all-reduce",
        "all-reduce",
    ]
    # the last: a combined all-reduce whose tuple shape XLA numbers (/*index=5*/), every element counted
    assert [c.bytes for c in found] == [4 * 16 * 8 * 4, 64 * 32 * 2, 8 * 4 + 2 * 4, 12, 8, 24, 4 * (1 + 4 + 3 + 6 + 1)]
    assert found[1].groups == ((0, 4, 1, 5), (2, 6, 3, 7))  # arange(8).reshape(2,4).T -> 2 groups of 4
    assert found[2].groups == ((0, 1), (2, 3), (4, 5), (6, 7))
    # Grid [1,4,2] over devices arange(8).reshape(2,4).T: grid (0, j, k) holds device 4k + j; groups
    # along axis_1 (k fixed) are {0,1,2,3} and {4,5,6,7}: expert and tensor of MESH.
    assert found[5].groups == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert [c.axes(MESH) for c in found] == [
        ("expert",),
        ("data", "tensor"),
        ("tensor",),
        ("data",),
        ("expert", "tensor"),
        ("expert", "tensor"),
        ("tensor",),
    ]


def test_unknown_group_forms_are_an_error_not_a_no_op():
    with pytest.raises(ValueError, match="does not know"):
        parse("  %x = f32[2]{0} all-reduce(f32[2]{0} %a), replica_groups=somethingelse, to_apply=%add")


def test_groups_that_follow_no_axis_are_an_error():
    with pytest.raises(ValueError, match="follow no set of mesh axes"):
        group_axes(((0, 3), (1, 2), (4, 7), (5, 6)), MESH)  # diagonal pairs
    assert group_axes(((0,), (1,)), MESH) == ()
