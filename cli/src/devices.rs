//! `visi-cli devices`: every adapter wgpu sees, with the limits and features the engine
//! uses, and which one `--device auto` picks.

use crate::errors::{human_bytes, internal, Failure};

/// Keeps Mesa's Vulkan drivers quiet on headless machines: they probe for a Wayland display
/// through libwayland, which prints "XDG_RUNTIME_DIR is invalid or not set" on stderr when
/// that variable is unset, breaking the one-line error contract. An absolute
/// `WAYLAND_DISPLAY` that does not exist makes the probe fail silently; the CLI never opens
/// a window. Called first thing in `main`, while the process is single-threaded.
pub fn quiet_headless_probe() {
    let unset = |k: &str| std::env::var_os(k).is_none_or(|v| v.is_empty());
    if unset("XDG_RUNTIME_DIR") && unset("WAYLAND_DISPLAY") && unset("WAYLAND_SOCKET") {
        std::env::set_var("WAYLAND_DISPLAY", "/nonexistent/visi-headless");
    }
}

/// Prints the adapter list: a table, or JSON with `json`.
pub fn devices(json: bool) -> Result<(), Failure> {
    // A VISI_ADAPTER that is not UTF-8 names no adapter: said, not ignored.
    engine_wgpu::adapter_env().map_err(crate::errors::classify)?;
    let list = engine_wgpu::list_adapters();
    if json {
        let v = serde_json::json!({
            "adapters": list,
            "auto": auto_choice(&list),
            "auto_backend": if list.iter().any(|a| a.auto_pick) { "wgpu" } else { "cpu" },
        });
        let text = serde_json::to_string_pretty(&v).map_err(|e| internal(e.into()))?;
        return crate::validate::println_stdout(&text);
    }
    crate::validate::print_stdout(&table(&list))
}

/// What `--device auto` runs on, and why, in words.
pub fn auto_choice(list: &[engine_wgpu::AdapterReport]) -> String {
    let why = engine_wgpu::auto_reason(list);
    match list.iter().find(|a| a.auto_pick) {
        Some(a) => format!("adapter {} ({}, {}): {why}", a.index, a.name, a.backend),
        None => format!("the CPU backend: {why}"),
    }
}

/// The human table.
pub fn table(list: &[engine_wgpu::AdapterReport]) -> String {
    let yes = |b: bool| if b { "yes" } else { "no" };
    let header = [
        "#",
        "auto",
        "name",
        "backend",
        "type",
        "driver",
        "max buffer",
        "max binding",
        "f16",
        "subgroups",
    ];
    let rows: Vec<[String; 10]> = list
        .iter()
        .map(|a| {
            let driver = if a.driver_info.is_empty() {
                a.driver.clone()
            } else {
                format!("{} {}", a.driver, a.driver_info)
            };
            [
                a.index.to_string(),
                if a.auto_pick { "*" } else { "" }.to_string(),
                a.name.clone(),
                a.backend.clone(),
                a.device_type.clone(),
                driver,
                human_bytes(a.max_buffer_size),
                human_bytes(a.max_storage_buffer_binding_size),
                yes(a.shader_f16).to_string(),
                yes(a.subgroups).to_string(),
            ]
        })
        .collect();
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .zip(&width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("{}\n", s.join("  ").trim_end())
    };
    let mut out = String::new();
    if rows.is_empty() {
        out.push_str("no wgpu adapters found\n");
    } else {
        out.push_str(&line(header.to_vec()));
        for r in &rows {
            out.push_str(&line(r.iter().map(String::as_str).collect()));
        }
    }
    out.push_str(&format!(
        "--device auto picks {}; --device gpu runs the best adapter (software too); --device cpu always works\n",
        auto_choice(list)
    ));
    out
}
