# ruff: noqa: E501 - HLO lines are kept whole, as XLA prints them
"""Hand-written scheduled HLO modules for the codesign readers' tests (schedule, timeline,
overlap report, pipeline transfers): one copy of the text whose every figure the tests derive
from the cost model by hand.

The a2a module (``a2a_module``) on ``AXES`` = (node=2, gpu=4): an async all-to-all over
``gpu`` with a 64x256x128 GEMM (``%g``) in its window, one over ``node`` with nothing in it,
and a loop of 3 sync all-to-alls in the backward pass; optionally a loop of 2 f32[256] adds
without collectives.
"""

AXES = {"node": 2, "gpu": 4}
G = "replica_groups=mesh['node'=2,'gpu'=4] {'gpu'}"
N = "replica_groups=mesh['node'=2,'gpu'=4] {'node'}"
SYNC = 'backend_config={"collective_backend_config":{"is_sync":true}}'

FUSED_DOT = """%fused_dot (p0: bf16[64,128], p1: bf16[128,256]) -> f32[64,256] {
  %p0 = bf16[64,128]{1,0} parameter(0)
  %p1 = bf16[128,256]{1,0} parameter(1)
  ROOT %dot.1 = f32[64,256]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}"""

# the inputs of the GEMM's operands (y, w) and of the collectives (x)
XWY = """  %x = bf16[4,16,8]{2,1,0} parameter(0)
  %w = bf16[128,256]{1,0} parameter(1)
  %y = bf16[64,128]{1,0} parameter(2)"""

A2A_LOOP = f"""%cond (c: (s32[], bf16[4,16,8])) -> pred[] {{
  %c = (s32[], bf16[4,16,8]{{2,1,0}}) parameter(0)
  %i = s32[] get-tuple-element(%c), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}}

%body (b: (s32[], bf16[4,16,8])) -> (s32[], bf16[4,16,8]) {{
  %b = (s32[], bf16[4,16,8]{{2,1,0}}) parameter(0)
  %x = bf16[4,16,8]{{2,1,0}} get-tuple-element(%b), index=1
  %a2a = bf16[4,16,8]{{2,1,0}} all-to-all(%x), channel_id=3, {G}, dimensions={{0}}, metadata={{op_name="jit(f)/transpose(jvp(moe))/all_to_all"}}, {SYNC}
  %j = s32[] get-tuple-element(%b), index=0
  ROOT %t = (s32[], bf16[4,16,8]{{2,1,0}}) tuple(%j, %a2a)
}}"""

PLAIN_LOOP = """%cond2 (c2: (s32[], f32[256])) -> pred[] {
  %c2 = (s32[], f32[256]{0}) parameter(0)
  %i2 = s32[] get-tuple-element(%c2), index=0
  %n2 = s32[] constant(2)
  ROOT %lt2 = pred[] compare(%i2, %n2), direction=LT
}

%body2 (b2: (s32[], f32[256])) -> (s32[], f32[256]) {
  %b2 = (s32[], f32[256]{0}) parameter(0)
  %v = f32[256]{0} get-tuple-element(%b2), index=1
  %sum = f32[256]{0} add(%v, %v), metadata={op_name="jit(f)/shard_map/routed_experts/add"}
  %k = s32[] get-tuple-element(%b2), index=0
  ROOT %t2 = (s32[], f32[256]{0}) tuple(%k, %sum)
}"""


def module(*computations: str) -> str:
    """A scheduled module of ``computations`` (the ENTRY last)."""
    return "HloModule m, is_scheduled=true\n\n" + "\n\n".join(computations) + "\n"


def a2a_module(dot_op_name: str = "", plain_loop: bool = False) -> str:
    """The a2a module (see the module docstring); ``dot_op_name``: the GEMM's metadata
    (none when empty); ``plain_loop``: add the loop without collectives (``%loop2``)."""
    dot_meta = f', metadata={{op_name="{dot_op_name}"}}' if dot_op_name else ""
    meta = 'metadata={op_name="jit(f)/jvp(moe)/all_to_all"}'
    v_param, v_in = (
        (", v: f32[256]", "\n  %v0 = f32[256]{0} parameter(3)") if plain_loop else ("", "")
    )
    loop2 = """
  %tup2 = (s32[], f32[256]{0}) tuple(%z, %v0)
  %loop2 = (s32[], f32[256]{0}) while(%tup2), condition=%cond2, body=%body2, metadata={op_name="jit(f)/shard_map/while"}"""
    main = f"""ENTRY %main (x: bf16[4,16,8], w: bf16[128,256], y: bf16[64,128]{v_param}) -> bf16[4,16,8] {{
{XWY}{v_in}
  %s = ((bf16[4,16,8]{{2,1,0}}), bf16[4,16,8]{{2,1,0}}) all-to-all-start(%x), channel_id=1, {G}, dimensions={{0}}, {meta}
  %g = f32[64,256]{{1,0}} fusion(%y, %w), kind=kCustom, calls=%fused_dot{dot_meta}
  %d = bf16[4,16,8]{{2,1,0}} all-to-all-done(%s)
  %s2 = ((bf16[2,16,8]{{2,1,0}}), bf16[2,16,8]{{2,1,0}}) all-to-all-start(%x), channel_id=2, {N}, dimensions={{0}}, {meta}
  %d2 = bf16[2,16,8]{{2,1,0}} all-to-all-done(%s2)
  %z = s32[] constant(0)
  %tup = (s32[], bf16[4,16,8]{{2,1,0}}) tuple(%z, %d)
  %loop = (s32[], bf16[4,16,8]{{2,1,0}}) while(%tup), condition=%cond, body=%body{loop2 if plain_loop else ""}
  ROOT %out = bf16[4,16,8]{{2,1,0}} get-tuple-element(%loop), index=1
}}"""
    loops = (A2A_LOOP, PLAIN_LOOP) if plain_loop else (A2A_LOOP,)
    return module(FUSED_DOT, *loops, main)
