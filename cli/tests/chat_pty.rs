//! `visi-cli chat` in a terminal (a pty, driven with rexpect): the line editor's history
//! (Up recalls the last line), `/image` confirms, `/clear` is `/reset`, a timing line
//! follows each answer, `/stats` tells reused prompt tokens from prefilled ones, and
//! Ctrl-C at an empty prompt asks before quitting (the second one quits, exit 0).

use std::process::Command;

use anyhow::{Context, Result};
use rexpect::session::spawn_command;
use visi_tests::fixtures;

/// Upper bound on waiting for one expected output (a hang guard, not a speed check).
const WAIT_MS: u64 = 300_000;

#[test]
fn chat_in_a_terminal() -> Result<()> {
    let model = fixtures().join("tiny-llava-mha");
    let img = fixtures().join("images/square.png");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_visi-cli"));
    cmd.args(["chat", "--model"])
        .arg(&model)
        .args(["--device", "cpu", "--max-new-tokens", "3", "--image"])
        .arg(&img)
        .env("TERM", "xterm")
        .env_remove("CI");
    let mut p = spawn_command(cmd, Some(WAIT_MS)).context("spawning chat in a pty")?;
    p.exp_string("> ").context("first prompt")?;
    p.send_line("What is shown?")?;
    // The timing line after the answer.
    p.exp_regex(r"\(\d+ tokens in [0-9.]+ s, [0-9.]+ tokens/s; first token after \d+ ms; prefill \d+ new tokens")
        .context("timing line after turn 1")?;
    p.exp_string("> ")?;
    p.send_line("And the colour?")?;
    p.exp_regex(r"prefill \d+ new tokens at [0-9.]+ tokens/s, [1-9]\d* reused\)")
        .context("turn 2 reuses the first turn's tokens")?;
    p.exp_string("> ")?;
    p.send_line("/stats")?;
    p.exp_regex(r"prefill [0-9.]+ tokens/s over \d+ new tokens \([1-9]\d* reused\)")
        .context("/stats")?;
    p.exp_string("> ")?;
    // History: Up recalls `/stats`, Enter runs it again.
    p.send("\x1b[A")?;
    p.flush()?;
    p.send("\r")?;
    p.flush()?;
    p.exp_regex(r"over \d+ new tokens \([1-9]\d* reused\)")
        .context("Up arrow did not recall /stats")?;
    p.exp_string("> ")?;
    p.send_line(&format!("/image {}", img.display()))?;
    p.exp_regex(r"\(attached .*square\.png, \d+x\d+: it goes with your next message\)")
        .context("/image confirmation")?;
    p.exp_string("> ")?;
    p.send_line("/clear")?;
    p.exp_string("(new conversation)").context("/clear")?;
    p.exp_string("> ")?;
    // Ctrl-C at an empty prompt asks; the session goes on.
    p.send_control('c')?;
    p.exp_string("Ctrl-C again to quit")
        .context("first Ctrl-C")?;
    p.exp_string("> ")?;
    p.send_line("/help")?;
    p.exp_string("commands:")
        .context("still running after one Ctrl-C")?;
    p.exp_string("> ")?;
    p.send_control('c')?;
    p.exp_string("Ctrl-C again to quit")?;
    p.send_control('c')?;
    p.exp_eof().context("second Ctrl-C quits")?;
    let status = format!("{:?}", p.process().wait().context("wait")?);
    // nix's WaitStatus (not re-exported by rexpect): `Exited(Pid(n), 0)`.
    anyhow::ensure!(
        status.starts_with("Exited(") && status.ends_with(", 0)"),
        "chat ended with {status}"
    );
    Ok(())
}
