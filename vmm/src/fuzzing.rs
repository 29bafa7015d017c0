//! Fuzz harnesses for what reaches the VMM from outside the guest: HTTP requests on the API
//! socket and configuration files. The cargo-fuzz targets in `vmm/fuzz` call these; `cargo
//! test` replays the committed corpora (`vmm/fuzz/corpus/<target>`) through them.

use crate::VmConfig;
use crate::api::http;
use crate::config::json;

/// One API request's bytes: parsed into a request, the end of input, or an error that maps
/// to an HTTP status (400-599); never a panic.
pub fn http_request(input: &[u8]) {
    match http::read_request(&mut &input[..]) {
        Ok(Some(request)) => assert!(!request.method.is_empty() && request.path.starts_with('/')),
        Ok(None) => {}
        Err(e) => assert!(e.status().is_some_and(|s| (400..600).contains(&s)), "{e}"),
    }
}

/// A configuration file: read and validated, or refused with a message; never a panic.
pub fn vm_config(input: &[u8]) {
    match json::from_slice::<VmConfig>(input) {
        Ok(config) => {
            let _ = config.validate_machine(Some(8));
            let _ = config.validate(Some(8));
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

#[cfg(test)]
mod tests {
    /// Replays every committed corpus input without libFuzzer or nightly.
    #[test]
    fn committed_corpora_replay_without_a_panic() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        type Harness = fn(&[u8]);
        let targets: [(&str, Harness); 2] = [("http_request", super::http_request), ("vm_config", super::vm_config)];
        for (name, harness) in targets {
            let dir = root.join(name);
            let inputs: Vec<_> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|e| e.unwrap().path())
                .collect();
            assert!(inputs.len() >= 3, "{}: a corpus of {} inputs", dir.display(), inputs.len());
            for input in inputs {
                harness(&std::fs::read(&input).unwrap());
            }
        }
    }
}
