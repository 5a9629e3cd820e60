//! Progress bars for long stages: rate and ETA on a terminal, nothing otherwise.
use std::io::IsTerminal;

/// A bar over `n` units labelled `label`; hidden when `show` is false or stderr is not a
/// terminal (logs of batch jobs stay clean).
pub fn bar(n: usize, label: &str, show: bool) -> indicatif::ProgressBar {
    if !show || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(n as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_prefix(label.to_string());
    pb
}
