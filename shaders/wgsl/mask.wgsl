// mask: attention-mask rules as data, exactly as the CPU reference applies them
// (engine-core MaskRules: the first rule covering a (query, key) pair decides). The includer
// declares the uniform `p` with `mask` (the rule count, at most 16) and `rules`
// (array<vec4<u32>, 32>): rule r is rules[2r] = (query start, query end, key start, key end),
// rules[2r + 1].x = 0 (keep), 1 (zero) or 2 (sink), .y = the sink's target key.
// The rules are tested one by one without a loop: llvmpipe counts every loop iteration of a
// nest against its 65535 cap, and this runs inside the key loop. They are tested in groups of
// four behind one uniform branch each (`p.mask > 4g`), so a call without rules costs four
// uniform tests and two rules cost four rule tests, not sixteen.
// Within a group there is no branch and no early return: each test is a `&` of comparisons
// (WGSL's `&&` and `||` short-circuit, i.e. they are branches) and the answer is kept with
// `select`. SwiftShader's shader compiler takes time and memory exponential in the branches
// of a function (measured on a flash_attn_k build whose mask_kind kept 4, 6, 8 of the rules
// as `if (...) { return ...; }`: 0.9 s, 15 s, then std::bad_alloc past 3 GB; the 16-rule
// version grew to 24 GB), and the same branch count is no better for any other compiler.
// Returns 0: keep (also a keep rule's answer, which shadows later rules); 1: zero the
// probability (skip its P·V); 2: zero it and add it to the sum S_i that the sink puts back
// on its target key.
fn rule_hit(r: u32, row: u32, j: u32) -> bool {
    let a = p.rules[2u * r];
    return (r < p.mask) & (row >= a.x) & (row < a.y) & (j >= a.z) & (j < a.w);
}

// One rule of mask_kind: the first hit among rules not yet decided sets `kind`.
fn kind_step(kind: ptr<function, u32>, open: ptr<function, bool>, r: u32, row: u32, j: u32) {
    let hit = *open & rule_hit(r, row, j);
    *kind = select(*kind, p.rules[2u * r + 1u].x, hit);
    *open = *open & !hit;
}

fn mask_kind(row: u32, j: u32) -> u32 {
    var kind = 0u;
    var open = true;
    if (p.mask > 0u) {
        kind_step(&kind, &open, 0u, row, j);
        kind_step(&kind, &open, 1u, row, j);
        kind_step(&kind, &open, 2u, row, j);
        kind_step(&kind, &open, 3u, row, j);
    }
    if (p.mask > 4u) {
        kind_step(&kind, &open, 4u, row, j);
        kind_step(&kind, &open, 5u, row, j);
        kind_step(&kind, &open, 6u, row, j);
        kind_step(&kind, &open, 7u, row, j);
    }
    if (p.mask > 8u) {
        kind_step(&kind, &open, 8u, row, j);
        kind_step(&kind, &open, 9u, row, j);
        kind_step(&kind, &open, 10u, row, j);
        kind_step(&kind, &open, 11u, row, j);
    }
    if (p.mask > 12u) {
        kind_step(&kind, &open, 12u, row, j);
        kind_step(&kind, &open, 13u, row, j);
        kind_step(&kind, &open, 14u, row, j);
        kind_step(&kind, &open, 15u, row, j);
    }
    return kind;
}

fn sink_rule(r: u32, row: u32) -> bool {
    let a = p.rules[2u * r];
    return (r < p.mask) & (p.rules[2u * r + 1u].x == 2u) & (row >= a.x) & (row < a.y)
        & (a.z < a.w);
}

// One rule of sink_target: the first sink rule covering the row sets `to`.
fn sink_step(to: ptr<function, u32>, open: ptr<function, bool>, r: u32, row: u32) {
    let hit = *open & sink_rule(r, row);
    *to = select(*to, p.rules[2u * r + 1u].y, hit);
    *open = *open & !hit;
}

// The key the query at `row` puts its sunk probabilities on, or 0xffffffff.
fn sink_target(row: u32) -> u32 {
    var to = 0xffffffffu;
    var open = true;
    if (p.mask > 0u) {
        sink_step(&to, &open, 0u, row);
        sink_step(&to, &open, 1u, row);
        sink_step(&to, &open, 2u, row);
        sink_step(&to, &open, 3u, row);
    }
    if (p.mask > 4u) {
        sink_step(&to, &open, 4u, row);
        sink_step(&to, &open, 5u, row);
        sink_step(&to, &open, 6u, row);
        sink_step(&to, &open, 7u, row);
    }
    if (p.mask > 8u) {
        sink_step(&to, &open, 8u, row);
        sink_step(&to, &open, 9u, row);
        sink_step(&to, &open, 10u, row);
        sink_step(&to, &open, 11u, row);
    }
    if (p.mask > 12u) {
        sink_step(&to, &open, 12u, row);
        sink_step(&to, &open, 13u, row);
        sink_step(&to, &open, 14u, row);
        sink_step(&to, &open, 15u, row);
    }
    return to;
}

// Whether the query at `row` seeing `visible` keys puts S_i back on its sink target.
fn sink_redirect(row: u32, visible: u32) -> bool {
    return sink_target(row) < visible;
}
