// mask: attention-mask rules as data, exactly as the CPU reference applies them
// (engine-core MaskRules: the first rule covering a (query, key) pair decides). The includer
// declares the uniform `p` with `mask` (the rule count, at most 16) and `rules`
// (array<vec4<u32>, 32>): rule r is rules[2r] = (query start, query end, key start, key end),
// rules[2r + 1].x = 0 (keep), 1 (zero) or 2 (sink), .y = the sink's target key.
// The rules are tested one by one without a loop: llvmpipe counts every loop iteration of a
// nest against its 65535 cap, and this runs inside the key loop. The tests stop after the
// last rule in use (a uniform branch), so two rules cost two tests, not sixteen.
// Returns 0: keep (also a keep rule's answer, which shadows later rules); 1: zero the
// probability (skip its P·V); 2: zero it and add it to the sum S_i that the sink puts back
// on its target key.
fn rule_hit(r: u32, row: u32, j: u32) -> bool {
    let a = p.rules[2u * r];
    return r < p.mask && row >= a.x && row < a.y && j >= a.z && j < a.w;
}

fn mask_kind(row: u32, j: u32) -> u32 {
    if (p.mask == 0u) { return 0u; }
    if (rule_hit(0u, row, j)) { return p.rules[1u].x; }
    if (p.mask <= 1u) { return 0u; }
    if (rule_hit(1u, row, j)) { return p.rules[3u].x; }
    if (p.mask <= 2u) { return 0u; }
    if (rule_hit(2u, row, j)) { return p.rules[5u].x; }
    if (p.mask <= 3u) { return 0u; }
    if (rule_hit(3u, row, j)) { return p.rules[7u].x; }
    if (p.mask <= 4u) { return 0u; }
    if (rule_hit(4u, row, j)) { return p.rules[9u].x; }
    if (p.mask <= 5u) { return 0u; }
    if (rule_hit(5u, row, j)) { return p.rules[11u].x; }
    if (p.mask <= 6u) { return 0u; }
    if (rule_hit(6u, row, j)) { return p.rules[13u].x; }
    if (p.mask <= 7u) { return 0u; }
    if (rule_hit(7u, row, j)) { return p.rules[15u].x; }
    if (p.mask <= 8u) { return 0u; }
    if (rule_hit(8u, row, j)) { return p.rules[17u].x; }
    if (p.mask <= 9u) { return 0u; }
    if (rule_hit(9u, row, j)) { return p.rules[19u].x; }
    if (p.mask <= 10u) { return 0u; }
    if (rule_hit(10u, row, j)) { return p.rules[21u].x; }
    if (p.mask <= 11u) { return 0u; }
    if (rule_hit(11u, row, j)) { return p.rules[23u].x; }
    if (p.mask <= 12u) { return 0u; }
    if (rule_hit(12u, row, j)) { return p.rules[25u].x; }
    if (p.mask <= 13u) { return 0u; }
    if (rule_hit(13u, row, j)) { return p.rules[27u].x; }
    if (p.mask <= 14u) { return 0u; }
    if (rule_hit(14u, row, j)) { return p.rules[29u].x; }
    if (p.mask <= 15u) { return 0u; }
    if (rule_hit(15u, row, j)) { return p.rules[31u].x; }
    return 0u;
}

fn sink_rule(r: u32, row: u32) -> bool {
    let a = p.rules[2u * r];
    return r < p.mask && p.rules[2u * r + 1u].x == 2u && row >= a.x && row < a.y && a.z < a.w;
}

// The key the query at `row` puts its sunk probabilities on, or 0xffffffff.
fn sink_target(row: u32) -> u32 {
    if (p.mask == 0u) { return 0xffffffffu; }
    if (sink_rule(0u, row)) { return p.rules[1u].y; }
    if (p.mask <= 1u) { return 0xffffffffu; }
    if (sink_rule(1u, row)) { return p.rules[3u].y; }
    if (p.mask <= 2u) { return 0xffffffffu; }
    if (sink_rule(2u, row)) { return p.rules[5u].y; }
    if (p.mask <= 3u) { return 0xffffffffu; }
    if (sink_rule(3u, row)) { return p.rules[7u].y; }
    if (p.mask <= 4u) { return 0xffffffffu; }
    if (sink_rule(4u, row)) { return p.rules[9u].y; }
    if (p.mask <= 5u) { return 0xffffffffu; }
    if (sink_rule(5u, row)) { return p.rules[11u].y; }
    if (p.mask <= 6u) { return 0xffffffffu; }
    if (sink_rule(6u, row)) { return p.rules[13u].y; }
    if (p.mask <= 7u) { return 0xffffffffu; }
    if (sink_rule(7u, row)) { return p.rules[15u].y; }
    if (p.mask <= 8u) { return 0xffffffffu; }
    if (sink_rule(8u, row)) { return p.rules[17u].y; }
    if (p.mask <= 9u) { return 0xffffffffu; }
    if (sink_rule(9u, row)) { return p.rules[19u].y; }
    if (p.mask <= 10u) { return 0xffffffffu; }
    if (sink_rule(10u, row)) { return p.rules[21u].y; }
    if (p.mask <= 11u) { return 0xffffffffu; }
    if (sink_rule(11u, row)) { return p.rules[23u].y; }
    if (p.mask <= 12u) { return 0xffffffffu; }
    if (sink_rule(12u, row)) { return p.rules[25u].y; }
    if (p.mask <= 13u) { return 0xffffffffu; }
    if (sink_rule(13u, row)) { return p.rules[27u].y; }
    if (p.mask <= 14u) { return 0xffffffffu; }
    if (sink_rule(14u, row)) { return p.rules[29u].y; }
    if (p.mask <= 15u) { return 0xffffffffu; }
    if (sink_rule(15u, row)) { return p.rules[31u].y; }
    return 0xffffffffu;
}

// Whether the query at `row` seeing `visible` keys puts S_i back on its sink target.
fn sink_redirect(row: u32, visible: u32) -> bool {
    return sink_target(row) < visible;
}
